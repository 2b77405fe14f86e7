"""The one decoding rule of both view loaders: an image file -> 8-bit RGB, mode by mode.

DALI's CPU decoder (``fn.decoders.image_slice``, nvidia-dali 2.4) was measured mode by mode and
its output is the rule where it is sensible; PIL, which the torch backend decodes with, is made
to give the same pixels here (``tests/test_decoding.py`` checks both against each other):

- 1, L (1-8 bits), RGB: as stored; grey is repeated in R, G and B.
- P: the palette's colours; palette transparency is ignored.
- RGBA, LA: alpha is dropped and the colour kept as stored (no compositing on a background).
- 16-bit samples (I;16 grey PNG, TIFF, PGM; 16-bit RGB, RGBA and grey + alpha PNG):
  ``round(v / 257)``. PIL's ``convert("RGB")`` clips I;16 to 0 or 255, and it reads a 16-bit
  colour PNG by its high bytes only, so those are read twice (``_png16_samples``).
- CMYK (JPEG, TIFF): ``R = floor((255 - C) (255 - K) / 255)``, G from M and B from Y likewise;
  a JPEG's samples count as inverted only when it has an Adobe marker (Pillow always inverts).
- anything else (32-bit integer or float samples, a PGM/PPM whose maxval is neither 255 nor
  65535, 16-bit colour outside PNG, YCbCr, ...): refused (``refusal``). DALI fails on some of
  these and reads others its own way, so ``ImageDataset.read_sizes`` refuses them at the header
  and neither backend reads their pixels.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fastkd.errors import DatasetError

if TYPE_CHECKING:
    from PIL import Image

# The file name extensions of images: in a folder, and as a shard member's field (without the dot).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")

Kind = Literal["8-bit", "palette", "cmyk", "grey16", "colour16-png"]

_EIGHT_BIT = frozenset({"1", "L", "LA", "RGB", "RGBA"})
_GREY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})  # PIL's 16-bit grey modes and rawmodes
_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}  # 16-bit colour PNG
_WHY_NOT = {
    "I": "32-bit integer samples, or a PGM/PPM whose maxval is neither 255 nor 65535",
    "F": "32-bit float samples",
    "YCbCr": "YCbCr samples",
}


def refusal(image: Image.Image) -> str | None:
    """Why the rule has no decoding for an opened image (from its header alone), or None."""
    try:
        _kind(image)
    except DatasetError as error:
        return str(error)
    return None


def decode_rgb(path: str | Path, data: bytes | None = None) -> Image.Image:
    """The file's pixels by the rule: an 8-bit RGB image. ``DatasetError`` naming the file for a
    refused mode; PIL's own errors for a file it cannot read. ``data``: the file's bytes, when
    the caller has read them already (the loaders hash what they read); then ``path`` only names
    the image in messages (a shard member's ``shard.tar:member``)."""
    from PIL import Image, UnidentifiedImageError

    source = path if data is None else io.BytesIO(data)
    try:
        opened = Image.open(source)
    except UnidentifiedImageError:  # from memory PIL would name a BytesIO: name the file
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
    with opened as image:
        try:
            kind = _kind(image)
        except DatasetError as error:
            raise DatasetError(f"image {path}: {error}") from None
        if kind == "8-bit":
            return image.convert("RGB")
        if kind == "palette":
            image.info.pop("transparency", None)  # ignored; PIL would warn about it
            return image.convert("RGB")
        if kind == "cmyk":
            ink = np.asarray(image, dtype=np.int64)
            if image.format in ("JPEG", "MPO") and "adobe" not in image.info:
                ink = 255 - ink  # Pillow inverted samples that were stored plain
            paper = (255 - ink[..., :3]) * (255 - ink[..., 3:]) // 255
            return Image.fromarray(paper.astype(np.uint8), "RGB")
        samples = np.asarray(image) if kind == "grey16" else _png16_samples(source)
    samples = samples.reshape(*samples.shape[:2], -1).astype(np.int64)
    colour = samples[..., :3] if samples.shape[2] >= 3 else samples[..., :1]  # alpha dropped
    eight = (colour * 2 + 257) // 514  # round(v / 257), v in 0..65535
    return Image.fromarray(np.repeat(eight, 3 // eight.shape[2], axis=2).astype(np.uint8), "RGB")


def _kind(image: Image.Image) -> Kind:
    """Which branch of the rule decodes the image; ``DatasetError`` (no file named) if none."""
    mode, rawmode = image.mode, _rawmode(image)
    if mode in _GREY16 or (mode == "I" and rawmode in _GREY16):
        return "grey16"
    if rawmode.partition(";")[2] in ("16B", "16L", "16N"):  # 16 bits a sample, 2+ samples
        if image.format == "PNG" and rawmode in _LOW_BYTES:
            return "colour16-png"
        raise DatasetError(
            f"16-bit colour samples in a {image.format} file have no decoding rule both loaders "
            "share (16-bit colour PNGs do): convert it to 8 bits, or to PNG"
        )
    if mode in _EIGHT_BIT:
        return "8-bit"
    if mode == "P":
        return "palette"
    if mode == "CMYK":
        return "cmyk"
    raise DatasetError(
        f"mode {mode} ({_WHY_NOT.get(mode, 'no 8- or 16-bit grey or colour samples')}) has no "
        "decoding rule both loaders share: convert it to 8-bit RGB or grey"
    )


def _rawmode(image: Image.Image) -> str:
    """How the file stores a pixel as PIL reads it (e.g. ``RGB;16B``), or the mode."""
    args = image.tile[0][3] if image.tile else None
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else image.mode


def _png16_samples(path: Path | io.BytesIO) -> np.ndarray:
    """A 16-bit colour PNG's samples, uint16 [H, W, C]. PIL reads their high bytes; read again
    with a rawmode of as many bits that keeps the low ones (the unpackers of little-endian
    16-bit samples keep the second byte, which is big-endian PNG data's low byte)."""
    from PIL import Image

    if isinstance(path, io.BytesIO):
        path.seek(0)
    with Image.open(path) as image:
        rawmode = _rawmode(image)
        image.tile = [(*image.tile[0][:3], _LOW_BYTES[rawmode])]
        low = np.asarray(image).astype(np.uint16)
    if rawmode == "LA;16B":  # read as raw RGBA bytes: grey high, grey low, alpha high, alpha low
        return (low[..., 0::2] << 8) | low[..., 1::2]
    if isinstance(path, io.BytesIO):
        path.seek(0)
    with Image.open(path) as image:
        high = np.asarray(image).astype(np.uint16)
    return (high << 8) | low
