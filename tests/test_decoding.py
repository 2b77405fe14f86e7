"""One decoding rule for the view loaders (``fastkd.data.decoding``): every image mode gives
DALI, nvjpeg and torch the same pixels, and those pixels are the rule's.

Each case writes a 37 x 29 image in one mode with PIL (smooth gradients; the 16-bit ones use
many low bytes, so a high-byte cut and a rounding differ) and loads two views of it with each
backend through ``view_loader``. Tolerances, in grey levels (0-255), the tightest that hold:

- the exact view, a 20 x 24 crop at (3, 5), mirrored and "resized" to its own size (no
  resampling): its pixels are the decoded ones, so the backends must agree exactly
  (``EXACT_GREY`` = 0). The PNG and TIFF cases are lossless; both backends decode a JPEG with
  libjpeg-turbo (integer IDCT, fancy upsampling), which gives the same bytes (0 measured).
- resized views, both crops to 16 x 16 bicubic: DALI's resampling is not PIL's and each rounds
  to uint8 its own way, so they may differ by ``RESIZED_GREY`` = 1 level (measured 1), on
  average by ``MEAN_GREY`` = 0.5 (measured 0.04-0.39); the bilevel image, all 0-255 steps where
  the two kernels differ most, by ``STEP_GREY`` = 8 (measured 8). A wrong decoding rule is far
  outside these: 16-bit grey clipped by PIL was 222 levels off, a CMYK JPEG without an Adobe
  marker 213, a 16-bit colour PNG cut to its high bytes 1 (which the exact view catches).

nvjpeg against torch (``test_nvjpeg_decodes_every_mode_as_torch``): on a CPU device its JPEG
decoder is torchvision's libjpeg-turbo, PIL's bytes exactly, and its other files are PIL's in the
workers, so the exact view agrees exactly and the resized ones to ``RESIZED_GREY`` (its resize
is PIL's in float32, 1 level measured). The rule itself is checked without DALI, against the
samples each image was written from (``test_decode_rgb_follows_the_rule``); modes without a
shared rule are refused by every backend.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastkd.data import BadImageError, DatasetError, decode_rgb, open_dataset, view_loader

HEIGHT, WIDTH = 29, 37
EXACT_BOX, EXACT_FLIP = (3, 5, 20, 24), True
RESIZED_BOX, RESIZED_FLIP = (2, 4, 25, 30), False
EXACT_GREY = 0.0
RESIZED_GREY = 1.0
STEP_GREY = 8.0
MEAN_GREY = 0.5
JPEG_GREY = 6  # decode_rgb of a JPEG vs the samples written (quality 95, 4:2:0 chroma; 6 measured)
# mean 0 and std 1/255: the loaders' output is the image itself, in grey levels.
CONFIGS = [
    {"input_size": [3, *size], "interpolation": interp, "mean": [0.0] * 3, "std": [1 / 255] * 3}
    for size, interp in [(EXACT_BOX[2:], "bilinear"), ((16, 16), "bicubic")]
]

_Y, _X = np.mgrid[0:HEIGHT, 0:WIDTH]
GREY = (_X * 5 + _Y * 2).astype(np.uint8)  # 0..236
RGB = np.stack([GREY, (255 - _X * 6).astype(np.uint8), (_Y * 9).astype(np.uint8)], -1)
ALPHA = ((_X + _Y) * 4).astype(np.uint8)
GREY16 = (_X * 1500 + _Y * 301).astype(np.uint16)  # 0..62 428, low bytes all over
RGB16 = np.stack([GREY16, 65535 - GREY16, (_X * _Y * 63).astype(np.uint16)], -1)
ALPHA16 = (_X * 1700 + 999).astype(np.uint16)
INK = np.stack([GREY, 255 - GREY, (_X * 6).astype(np.uint8), (_Y * 4).astype(np.uint8)], -1)
PALETTE = [v for i in range(16) for v in (i * 17, 255 - i * 17, 128)]
INDICES = (_X * 15 // (WIDTH - 1)).astype(np.uint8)


def _png16(path: Path, samples: np.ndarray) -> None:
    """A 16-bit PNG of uint16 [H, W, C] (C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA): PIL writes
    16-bit grey only, so the file is put together here (no filter, one IDAT)."""
    samples = samples.astype(">u2").reshape(HEIGHT, WIDTH, -1)
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[samples.shape[2]]
    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 16, colour_type, 0, 0, 0)
    rows = b"".join(b"\0" + row.tobytes() for row in samples)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _palette(transparency: int | bytes | None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        image = Image.fromarray(INDICES, "P")
        image.putpalette(PALETTE)
        extra = {} if transparency is None else {"transparency": transparency}
        image.save(path, **extra)

    return write


def _cmyk_jpeg_without_adobe_marker(path: Path) -> None:
    """Pillow writes an Adobe marker (inverted samples) into every CMYK JPEG; cut it out."""
    Image.fromarray(INK, "CMYK").save(path, quality=95)
    data = path.read_bytes()
    start = data.index(b"\xff\xee")
    path.write_bytes(
        data[:start] + data[start + 2 + int.from_bytes(data[start + 2 : start + 4], "big") :]
    )


# case -> (file name, writer)
CASES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "L-png": ("l.png", lambda p: Image.fromarray(GREY, "L").save(p)),
    "L-jpeg": ("l.jpg", lambda p: Image.fromarray(GREY, "L").save(p, quality=95)),
    "1-png": ("bilevel.png", lambda p: Image.fromarray(GREY > 100).save(p)),
    "RGB-png": ("rgb.png", lambda p: Image.fromarray(RGB, "RGB").save(p)),
    "RGB-jpeg": ("rgb.jpg", lambda p: Image.fromarray(RGB, "RGB").save(p, quality=95)),
    "RGBA-png": ("rgba.png", lambda p: Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA").save(p)),
    "LA-png": ("la.png", lambda p: Image.fromarray(np.dstack([GREY, ALPHA]), "LA").save(p)),
    "P-png": ("p.png", _palette(None)),
    "P-png-transparent-index": ("p-index.png", _palette(3)),
    "P-png-alpha-per-entry": ("p-alpha.png", _palette(bytes(range(0, 256, 16)))),
    "I16-png": ("grey16.png", lambda p: Image.fromarray(GREY16).save(p)),
    "I16-tiff": ("grey16.tif", lambda p: Image.fromarray(GREY16).save(p)),
    "RGB16-png": ("rgb16.png", lambda p: _png16(p, RGB16)),
    "RGBA16-png": ("rgba16.png", lambda p: _png16(p, np.dstack([RGB16, ALPHA16]))),
    "LA16-png": ("la16.png", lambda p: _png16(p, np.dstack([GREY16, ALPHA16]))),
    "CMYK-jpeg": ("cmyk.jpg", lambda p: Image.fromarray(INK, "CMYK").save(p, quality=95)),
    "CMYK-jpeg-no-adobe-marker": ("cmyk-plain.jpg", _cmyk_jpeg_without_adobe_marker),
    "CMYK-tiff": ("cmyk.tif", lambda p: Image.fromarray(INK, "CMYK").save(p)),
}
# Modes no rule covers: refused by both backends, naming the file.
REFUSED: dict[str, tuple[str, Callable[[Path], None]]] = {
    "I32-tiff": (
        "int32.tif",
        lambda p: Image.fromarray(GREY16.astype(np.int32) * 3 - 70000).save(p),
    ),
    "F-tiff": ("float.tif", lambda p: Image.fromarray(GREY16.astype(np.float32) / 65535).save(p)),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case's image in ``images/``, and per case a file list ``<case>.txt`` naming it."""
    root = tmp_path_factory.mktemp("modes")
    (root / "images").mkdir()
    for case, (name, write) in {**CASES, **REFUSED}.items():
        write(root / "images" / name)
        (root / f"{case}.txt").write_text(f"images/{name} 0\n")
    return root


def _load(images: Path, case: str, backend: str) -> list[torch.Tensor]:
    """Both views of the case's image, per config: float32 [2, 3, H, W] in grey levels."""
    dataset = open_dataset(images / f"{case}.txt")
    fractions = np.array([EXACT_BOX, RESIZED_BOX], dtype=np.float64)
    fractions /= [HEIGHT, WIDTH, HEIGHT, WIDTH]
    (batch,) = view_loader(
        dataset,
        np.zeros(2, dtype=np.int64),
        np.arange(2),
        fractions,
        np.array([EXACT_FLIP, RESIZED_FLIP]),
        CONFIGS,
        batch_size=2,
        backend=backend,
        num_workers=1 if backend == "dali" else 0,
    )
    return batch.images


@pytest.mark.parametrize("case", CASES)
def test_backends_decode_every_mode_alike(images: Path, case: str) -> None:
    pytest.importorskip("nvidia.dali")
    dali, torch_ = _load(images, case, "dali"), _load(images, case, "torch")
    exact = (dali[0][0] - torch_[0][0]).abs()
    assert exact.max() <= EXACT_GREY, f"{case}: decoded pixels differ by up to {exact.max():.0f}"
    for config in range(len(CONFIGS)):
        grey = (dali[config] - torch_[config]).abs()
        if config == 0:
            grey = grey[1:]  # the exact view is checked above
        assert grey.max() <= (STEP_GREY if case == "1-png" else RESIZED_GREY) + 1e-3, case
        assert grey.mean() <= MEAN_GREY, case


@pytest.mark.parametrize("case", CASES)
def test_nvjpeg_decodes_every_mode_as_torch(images: Path, case: str) -> None:
    """Grey and colour JPEGs go to torchvision's decoder, the CMYK ones and the other formats
    to PIL in the workers: either way the rule's pixels."""
    nvjpeg, torch_ = _load(images, case, "nvjpeg"), _load(images, case, "torch")
    assert torch.equal(nvjpeg[0][0], torch_[0][0]), f"{case}: the decoded pixels differ"
    for config in range(len(CONFIGS)):
        grey = (nvjpeg[config] - torch_[config]).abs()
        assert grey.max() <= RESIZED_GREY + 1e-3 and grey.mean() <= MEAN_GREY, case


def _grey(samples: np.ndarray) -> np.ndarray:
    return np.repeat(samples[..., None], 3, axis=2)


def _to_8_bits(samples: np.ndarray) -> np.ndarray:
    return np.rint(samples / 257).astype(np.uint8)


def _paper(ink: np.ndarray) -> np.ndarray:
    """CMYK -> RGB: floor((255 - C)(255 - K) / 255), as DALI converts."""
    ink = ink.astype(np.int64)
    return ((255 - ink[..., :3]) * (255 - ink[..., 3:]) // 255).astype(np.uint8)


_PALETTE_RGB = np.array(PALETTE, dtype=np.uint8).reshape(-1, 3)[INDICES]
# case -> the rule's RGB of the samples written; JPEG cases are lossy (``JPEG_GREY``).
RULE = {
    "L-png": _grey(GREY),
    "L-jpeg": _grey(GREY),
    "1-png": _grey((GREY > 100).astype(np.uint8) * 255),
    "RGB-png": RGB,
    "RGB-jpeg": RGB,
    "RGBA-png": RGB,
    "LA-png": _grey(GREY),
    "P-png": _PALETTE_RGB,
    "P-png-transparent-index": _PALETTE_RGB,
    "P-png-alpha-per-entry": _PALETTE_RGB,
    "I16-png": _grey(_to_8_bits(GREY16)),
    "I16-tiff": _grey(_to_8_bits(GREY16)),
    "RGB16-png": _to_8_bits(RGB16),
    "RGBA16-png": _to_8_bits(RGB16),
    "LA16-png": _grey(_to_8_bits(GREY16)),
    "CMYK-jpeg": _paper(INK),
    # Pillow stored 255 - INK (Adobe's inverted samples); without the marker they are plain ink.
    "CMYK-jpeg-no-adobe-marker": _paper(255 - INK),
    "CMYK-tiff": _paper(INK),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_rgb_follows_the_rule(images: Path, case: str) -> None:
    name, _ = CASES[case]
    decoded = decode_rgb(images / "images" / name)
    assert decoded.mode == "RGB" and decoded.size == (WIDTH, HEIGHT)
    error = np.abs(np.asarray(decoded, dtype=np.int64) - RULE[case]).max()
    assert error <= (JPEG_GREY if name.endswith(".jpg") else 0), f"{case}: off by {error}"


@pytest.mark.parametrize("backend", ["torch", "dali", "nvjpeg"])
@pytest.mark.parametrize("case", REFUSED)
def test_modes_without_a_rule_are_refused(images: Path, case: str, backend: str) -> None:
    """Both backends fail on them naming the file (DALI would decode some its own way), and
    the data set's header read already marks them unreadable."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    name, _ = REFUSED[case]
    _, unreadable = open_dataset(images / f"{case}.txt").read_sizes()
    assert "no decoding rule" in unreadable[0]
    with pytest.raises(BadImageError, match=rf"{name} \(sample 0\): .*no decoding rule"):
        _load(images, case, backend)
    with pytest.raises(DatasetError, match=rf"image .*{name}: mode"):
        decode_rgb(images / "images" / name)
