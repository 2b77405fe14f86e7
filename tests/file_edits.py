"""Edits of data files the fault-injection tests make: another image, byte for byte as long."""

from __future__ import annotations

from pathlib import Path


def same_size_other_png(path: Path) -> bytes:
    """Another image (mirrored, inverted) saved as a PNG of exactly ``path``'s byte size: a tEXt
    chunk pads it (the data fingerprint, names and sizes, cannot tell it from the original)."""
    import io

    from PIL import Image, ImageOps
    from PIL.PngImagePlugin import PngInfo

    size = path.stat().st_size
    with Image.open(path) as image:
        other = ImageOps.invert(ImageOps.mirror(image.convert("RGB")))
    for level in range(9, -1, -1):
        plain = io.BytesIO()
        other.save(plain, "PNG", compress_level=level)
        pad = size - len(plain.getvalue()) - 12 - 2  # chunk length, type, CRC; "k" and its NUL
        if pad >= 0:
            info = PngInfo()
            info.add_text("k", "x" * pad)
            padded = io.BytesIO()
            other.save(padded, "PNG", compress_level=level, pnginfo=info)
            assert len(padded.getvalue()) == size
            return padded.getvalue()
    raise AssertionError(f"cannot make a PNG of {size} bytes")
