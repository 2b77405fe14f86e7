"""Decoding that cannot crash: a cut or damaged image file is refused from its bytes
(``fastkd.data.wholeness``) before any decoder sees it, so DALI never gets one (it crashed the
whole process on cut PNGs and decoded cut JPEGs without a word), and every view-loader backend
refuses, or skips, the same files with the same reason, with any number of workers.

The check is held to hand-made files (real photos, cut or damaged where it is known) and to PIL,
which refuses the same cut files; the loaders to ``fastkd dump`` and ``fastkd eval`` on a data set
holding one cut PNG or JPEG, the dump in a subprocess, where a crash shows as its exit code. A file
that is not whole yet PIL decodes in full (a JPEG without its end marker) is still read, by PIL
on every backend, as the torch backend read it before the check.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image
from test_cli_messages import DATA_CONFIG, LOG_LINE, assert_one_line_error, invoke
from typer.testing import CliRunner

from fastkd.api import ViewTransform
from fastkd.checkpoints import save_checkpoint
from fastkd.cli.main import app
from fastkd.data import ImageDataset, open_dataset, view_loader
from fastkd.data.wholeness import incomplete
from fastkd.errors import USER_ERROR_EXIT, DatasetError

BACKENDS = ["torch", "dali", "nvjpeg"]
BAD = 20  # the cut file's sample: with 8 views a sample, in the second batch of 128 items


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 96 x 64 piece of a real photo (scikit-learn's sample image)."""
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0]).crop((200, 100, 296, 164))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def pil_refuses(data: bytes) -> bool:
    """Whether PIL (the torch backend's decoder) fails on the bytes: an independent verdict."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns of cut TIFF directories, then fails
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    except Exception:  # PIL raises many types for bad files
        return True
    return False


FORMATS = {  # name: (PIL format, options, mode)
    "PNG": ("PNG", {}, "RGB"),
    "JPEG": ("JPEG", {"quality": 90}, "RGB"),
    "progressive JPEG": ("JPEG", {"quality": 90, "progressive": True}, "RGB"),
    "BMP": ("BMP", {}, "RGB"),
    "PPM": ("PPM", {}, "RGB"),
    "PGM": ("PPM", {}, "L"),
    "TIFF": ("TIFF", {}, "RGB"),
    "LZW TIFF": ("TIFF", {"compression": "tiff_lzw"}, "RGB"),
    "WebP": ("WEBP", {"quality": 80}, "RGB"),
    "lossless WebP": ("WEBP", {"lossless": True}, "RGB"),
}


def format_file(photo: Image.Image, name: str) -> bytes:
    fmt, options, mode = FORMATS[name]
    return encode(photo.convert(mode), fmt, **options)


# -- the check, on hand-made files ---------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_a_whole_file_passes_with_or_without_bytes_after_it(photo, name):
    data = format_file(photo, name)
    assert incomplete(data) is None
    assert incomplete(data + b"\xff\xd8\x00trailing bytes") is None  # e.g. after a JPEG's EOI


@pytest.mark.parametrize("name", FORMATS)
def test_a_cut_file_is_truncated_wherever_it_is_cut_and_pil_refuses_it_too(photo, name):
    data = format_file(photo, name)
    kind = name.split()[-1]
    for cut in range(12, len(data)):  # from past the longest signature to the last byte
        why = incomplete(data[:cut])
        assert why is not None and why.startswith(f"truncated {kind}"), (cut, why)
    for cut in (20, len(data) // 4, len(data) // 2, len(data) * 9 // 10):
        assert pil_refuses(data[:cut]), cut


@pytest.mark.parametrize("name", FORMATS)
def test_damaged_bytes_never_raise(photo, name):
    """Whatever the bytes, a reason or None: the check runs where DALI's source is fed."""
    data, rng = format_file(photo, name), np.random.default_rng(0)
    for _ in range(300):
        damaged = np.frombuffer(data, dtype=np.uint8).copy()
        damaged[rng.integers(0, len(data), 3)] = rng.integers(0, 256, 3)
        assert isinstance(incomplete(damaged.tobytes()), str | None)


def test_a_png_whose_bytes_changed_fails_its_crc(photo):
    data = bytearray(format_file(photo, "PNG"))
    idat = 8 + 12 + 13  # the signature, then IHDR (length, type, 13 bytes, CRC): hand-counted
    assert data[idat + 4 : idat + 8] == b"IDAT"
    data[idat + 8 + 100] ^= 0x04
    assert incomplete(bytes(data)) == "damaged PNG: its 'IDAT' chunk at byte 33 fails its CRC check"
    data[idat + 8 + 100] ^= 0x04
    data[16] ^= 0x01  # IHDR's width
    assert incomplete(bytes(data)) == "damaged PNG: its 'IHDR' chunk at byte 8 fails its CRC check"


def with_exif_thumbnail(jpeg: bytes, thumbnail: bytes) -> bytes:
    """``jpeg`` with an APP1 EXIF segment after its SOI whose IFD1 holds ``thumbnail`` (tags
    JPEGInterchangeFormat and its length), as cameras write them."""
    ifd1 = 8 + 6  # the TIFF header, then an empty IFD0 (no entries, the next IFD's offset)
    at = ifd1 + 2 + 2 * 12 + 4  # after IFD1's two entries and its next-IFD offset
    tiff = struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<HI", 0, ifd1)
    tiff += struct.pack("<H", 2) + struct.pack("<HHII", 0x201, 4, 1, at)
    tiff += struct.pack("<HHII", 0x202, 4, 1, len(thumbnail)) + struct.pack("<I", 0) + thumbnail
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(payload)) + payload + jpeg[2:]


def test_an_exif_thumbnails_end_marker_is_not_the_images_end(photo):
    thumbnail = encode(photo.resize((16, 11)), "JPEG")
    data = with_exif_thumbnail(encode(photo, "JPEG", quality=90), thumbnail)
    with Image.open(io.BytesIO(data)) as image:  # a valid file, its EXIF holding the thumbnail
        image.load()
        assert thumbnail in image.info["exif"]
    assert incomplete(data) is None
    scan = data.rindex(b"\xff\xda")  # the image's (the thumbnail has its own)
    cut = data[: (scan + len(data)) // 2]
    assert 0 < cut.find(b"\xff\xd9") < scan  # the thumbnail's EOI is there, before the scan
    assert incomplete(cut) == (
        f"truncated JPEG: the file ends at byte {len(cut)} without its end-of-image marker (FF D9)"
    )
    assert pil_refuses(cut)


def test_a_progressive_jpeg_cut_between_its_scans_is_truncated(photo):
    data = format_file(photo, "progressive JPEG")
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    for cut in (second_scan, second_scan + 20):
        assert incomplete(data[:cut]).startswith("truncated JPEG: "), cut
        assert pil_refuses(data[:cut])


def test_other_bytes_are_left_to_the_decoders(photo):
    assert incomplete(encode(photo, "GIF")[:50]) is None
    assert incomplete(b"") is None
    assert incomplete(b"not an image at all") is None


# -- every backend, through the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory, photo: Image.Image) -> SimpleNamespace:
    """Image folders of two classes of 16 random 16 px PNGs, sample ``BAD`` cut: in ``png``
    a PNG cut in half; in ``jpeg`` a tall photo JPEG (32 x 128) cut at 3/4 of its bytes, so its
    eval view (the centre) lies before the cut; in ``both`` the PNG and the JPEG, as sample
    ``BAD + 1``. And an untrained two-class timm model's checkpoint."""
    root = tmp_path_factory.mktemp("cut")
    rng = np.random.default_rng(0)
    keys = [f"{label}/{i:02d}.png" for label in "ab" for i in range(16)]
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)) for _ in keys]
    kinds = ("png", "jpeg", "both")
    for kind in kinds:
        for key, image in zip(keys, images, strict=True):
            (root / kind / key).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / kind / key)
    whole = encode(images[BAD], "PNG")
    png = whole[: len(whole) // 2]
    jpeg = encode(photo.resize((32, 128)), "JPEG", quality=90)
    jpeg = jpeg[: len(jpeg) * 3 // 4]
    as_jpeg = {key: key.replace(".png", ".jpg") for key in keys}
    bad = {"png": root / "png" / keys[BAD], "jpeg": root / "jpeg" / as_jpeg[keys[BAD]]}
    bad["png"].write_bytes(png)
    (root / "jpeg" / keys[BAD]).unlink()
    bad["jpeg"].write_bytes(jpeg)
    (root / "both" / keys[BAD]).write_bytes(png)
    (root / "both" / keys[BAD + 1]).unlink()
    (root / "both" / as_jpeg[keys[BAD + 1]]).write_bytes(jpeg)
    model = timm.create_model("test_convnext", num_classes=2)
    checkpoint = save_checkpoint(
        root / "m.pt", model, "test_convnext", {"num_classes": 2}, DATA_CONFIG
    )
    data = {kind: root / kind for kind in kinds}
    skipped = [keys[BAD], as_jpeg[keys[BAD + 1]]]  # in ``both``
    return SimpleNamespace(data=data, bad=bad, skipped=skipped, spec=f"test_convnext={checkpoint}")


def needs(backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


def refusal(path: Path, sample: int = BAD) -> str:
    """The one line every backend ends with: the check's reason, computed here from the file."""
    return f"error: cannot read image {path} (sample {sample}): {incomplete(path.read_bytes())}. "


# PNG: DALI crashed when the cut file lay in a batch it prefetched, the more often the larger
# the batch (8 views of 32 images in batches of 128: sample 20 is in the second); JPEG: DALI
# decoded its eval view (which lies before the cut) without a word.
DUMP_VIEWS = {"png": ("--views", "8", "--batch-size", "128"), "jpeg": ("--views", "1")}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_cut_file_ends_a_dump_in_one_line_on_every_backend(cut, kind, backend, workers, tmp_path):
    """In a subprocess: a crash is an exit code there (139, or -11 from Python)."""
    needs(backend)
    out = str(tmp_path / "store")
    args = ["dump", "--data", str(cut.data[kind]), "--model", cut.spec, "--out", out]
    args += [*DUMP_VIEWS[kind], "--backend", backend, "--workers", str(workers), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "fastkd.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},  # no line wrapping
        timeout=300,
    )
    assert done.returncode == USER_ERROR_EXIT, f"exit code {done.returncode}: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith(refusal(cut.bad[kind])), done.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipping_flags_exactly_the_cut_files(cut, backend, tmp_path):
    needs(backend)
    out = tmp_path / "store"
    args = ["dump", "--data", str(cut.data["both"]), "--model", cut.spec, "--out", str(out)]
    args += [*DUMP_VIEWS["png"], "--backend", backend, "--workers", "2", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--on-bad-image", "skip"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    group = zarr.open_group(out, mode="r")
    assert np.flatnonzero(group["skipped"][:]).tolist() == [BAD, BAD + 1]
    status = group.attrs["fastkd_status"]
    assert status == {"complete": True, "skipped": cut.skipped}
    for key in status["skipped"]:
        path = cut.data["both"] / key
        assert f"skipping unreadable image {path}: {incomplete(path.read_bytes())}" in result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_cut_file_ends_an_eval_in_one_line_on_every_backend(cut, kind, backend):
    needs(backend)
    args = ["eval", "--data", str(cut.data[kind]), "--model", cut.spec, "--backend", backend]
    line = assert_one_line_error(invoke(args))
    assert line.startswith(refusal(cut.bad[kind]).strip()), line


def _decoded_by_pil_in_full(photo: Image.Image, root: Path) -> tuple[ImageDataset, list[int]]:
    """A folder whose samples 1 and 2 are not whole yet PIL decodes them in full (PNGs without
    their IEND chunk, or without its last byte), among whole ones."""
    jpeg = encode(photo, "JPEG", quality=90)
    png = encode(photo.rotate(90, expand=True), "PNG")
    files = {"a/0.png": png, "a/1.png": png[:-12], "a/2.png": png[:-1], "b/3.jpg": jpeg}
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    assert incomplete(png[:-12]) and incomplete(png[:-1])  # not whole: never fed to DALI
    assert not pil_refuses(png[:-12]) and not pil_refuses(png[:-1])  # yet PIL decodes them
    assert pil_refuses(jpeg[:-2])  # a JPEG without its end marker: refused by both (tested above)
    return open_dataset(root), [1, 2]


def test_what_pil_decodes_in_full_is_decoded_by_pil_on_every_backend(photo, tmp_path):
    """Such files were read by the torch backend before the check, so stores dumped from them
    must keep training: every backend takes them, DALI's and nvjpeg's rows of them being PIL's
    exactly."""
    dataset, doubted = _decoded_by_pil_in_full(photo, tmp_path / "data")
    samples = np.repeat(np.arange(4), 2)
    boxes = np.tile(np.array([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.6]], np.float32), (4, 1))
    flips = np.tile([False, True], 4)
    loaded = {}
    for backend in BACKENDS:
        if backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
            continue
        batches = list(
            view_loader(
                dataset, samples, np.zeros(8, np.int64), boxes, flips, [DATA_CONFIG],
                batch_size=8, backend=backend, num_workers=0,
            )
        )  # fmt: skip
        assert len(batches) == 1 and not batches[0].skipped
        loaded[backend] = batches[0].images[0]
        assert loaded[backend].shape == (8, 3, 32, 32)
    rows = np.isin(samples, doubted)
    for backend in loaded.keys() - {"torch"}:
        torch.testing.assert_close(loaded[backend][rows], loaded["torch"][rows], rtol=0, atol=0)


def test_view_transform_takes_and_refuses_what_the_loaders_do(photo):
    """A PNG without its last byte decodes as the whole one; a PNG cut in half is refused."""
    transform = ViewTransform(DATA_CONFIG)
    whole = encode(photo, "PNG")
    full = transform(whole, (0.0, 0.0, 1.0, 1.0), False)
    assert torch.equal(transform(whole[:-1], (0.0, 0.0, 1.0, 1.0), False), full)
    with pytest.raises(
        DatasetError, match=r"cannot read image <bytes>: truncated PNG: its 'IDAT' chunk"
    ):
        transform(whole[: len(whole) // 2], (0.0, 0.0, 1.0, 1.0), False)


def test_absurd_header_fields_are_damage_not_an_exception():
    pgm = b"P5\n" + b"9" * 5000 + b" 3\n255\n" + bytes(10)  # a width of 5,000 digits
    assert incomplete(pgm).startswith("damaged PNM: its header cannot be read")
    big_tiff = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16)  # BigTIFF, first directory at 16
    strips = [(273, 16, 1, 2**63 + 5), (279, 16, 1, 10)]  # a LONG8 strip offset past 2^63
    big_tiff += struct.pack("<Q", len(strips))
    big_tiff += b"".join(struct.pack("<HHQQ", *entry) for entry in strips) + bytes(40)
    assert incomplete(big_tiff) == (
        f"truncated TIFF (strip 0): the file has {len(big_tiff)} bytes, its header describes "
        f"{2**63 + 15}"
    )
