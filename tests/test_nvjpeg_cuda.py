"""The nvjpeg backend on a GPU: torchvision's nvJPEG decodes the JPEGs, and what comes out agrees
with the CPU path (the torch backend: PIL). Skipped without CUDA; the CPU tests of the backend
(tests/test_data.py, test_decoding.py) run the same code with torchvision's CPU decoder.

Tolerances, in grey levels: NOT MEASURED YET (the session that wrote this had no GPU; measure
them on the first GPU run, the assertion messages print the figures, and tighten). nvJPEG's IDCT
and its chroma upsampling are not libjpeg-turbo's "fancy" ones, so a 4:2:0 JPEG may differ at
sharp colour edges by tens of levels on a few pixels, on average by well under one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import (
    PHOTO_CONFIGS,
    PHOTO_FILES,
    _bogus_huffman_table,
    _items,
    _load,
    photos,  # noqa: F401 (the fixture)
)

import fastkd.data.loader as loader
from fastkd.data import open_dataset, resolve_backend
from fastkd.data.nvjpeg import _decode_jpegs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NVJPEG_MEAN_GREY = 1.0  # estimate, see the docstring
NVJPEG_MAX_GREY = 32.0  # estimate, see the docstring


def test_auto_picks_nvjpeg_on_a_gpu_without_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_has_dali", lambda: False)
    assert resolve_backend("auto", "cuda") == "nvjpeg"
    assert resolve_backend("nvjpeg", "cuda") == "nvjpeg"


def test_nvjpeg_decodes_as_the_cpu_decoder(photos: Path) -> None:  # noqa: F811
    """Every JPEG the device takes, decoded whole on the GPU and on the CPU (libjpeg-turbo,
    PIL's bytes exactly); grey ones repeated into R, G and B on both."""
    files = [p for p in sorted(photos.rglob("*.jpg")) if PHOTO_FILES[p.name.partition("-")[2]]]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files]
    gpu = _decode_jpegs(encoded, torch.device("cuda"))
    cpu = _decode_jpegs(encoded, torch.device("cpu"))
    for path, on_gpu, on_cpu in zip(files, gpu, cpu, strict=True):
        assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape, path.name
        grey = (on_gpu.cpu().float() - on_cpu.float()).abs()
        figures = f"{path.name}: max {grey.max():.0f}, mean {grey.mean():.3f} levels"
        assert grey.mean() <= NVJPEG_MEAN_GREY and grey.max() <= NVJPEG_MAX_GREY, figures
        if path.name.endswith("grey.jpg"):
            assert torch.equal(on_gpu[:1].expand_as(on_gpu), on_gpu), path.name


def test_nvjpeg_on_the_gpu_matches_the_torch_backend(photos: Path) -> None:  # noqa: F811
    dataset = open_dataset(photos)
    items = _items(dataset)
    gpu = _load(dataset, items, PHOTO_CONFIGS, backend="nvjpeg", device="cuda")
    cpu = _load(dataset, items, PHOTO_CONFIGS, backend="torch")
    assert [b.samples.tolist() for b in gpu] == [b.samples.tolist() for b in cpu]
    assert [b.file_hashes.tolist() for b in gpu] == [b.file_hashes.tolist() for b in cpu]
    samples = torch.cat([b.samples for b in cpu]).numpy()
    host = ~np.array([PHOTO_FILES[dataset.keys[s].partition("-")[2]] for s in samples])
    for index, config in enumerate(PHOTO_CONFIGS):
        ours = torch.cat([b.images[index] for b in gpu])
        assert ours.is_cuda
        grey = (ours.cpu() - torch.cat([b.images[index] for b in cpu])).abs()
        figures = f"{config['interpolation']}: max {grey.max():.0f}, mean {grey.mean():.3f}"
        assert grey.mean() <= NVJPEG_MEAN_GREY and grey.max() <= NVJPEG_MAX_GREY, figures
        # the rows the workers made (PIL's views, only normalised on the GPU): the CPU's exactly
        host_grey = grey[torch.from_numpy(host)]
        assert host_grey.max() == 0, figures
        if config["interpolation"] == "lanczos":  # made by PIL in the workers, JPEGs too
            assert grey.max() == 0, figures


def test_a_jpeg_nvjpeg_rejects_fails_alone(photos: Path, tmp_path: Path) -> None:  # noqa: F811
    root = Path(shutil.copytree(photos, tmp_path / "data"))
    dataset = open_dataset(root)
    bad = dataset.keys.index("photo1/0-rgb.jpg")
    path = root / dataset.keys[bad]
    path.write_bytes(_bogus_huffman_table(path.read_bytes()))
    items = _items(dataset, views=1)
    (batch,) = _load(
        dataset, items, PHOTO_CONFIGS[:1], backend="nvjpeg", device="cuda", batch_size=64,
        on_bad_image="skip",
    )  # fmt: skip
    assert list(batch.skipped) == [bad], batch.skipped
    assert batch.samples.tolist() == [s for s in items["samples"].tolist() if s != bad]
    (by_torch,) = _load(
        dataset, items, PHOTO_CONFIGS[:1], backend="torch", batch_size=64, on_bad_image="skip"
    )
    assert batch.skipped == by_torch.skipped  # PIL cannot read it either: PIL's reason
