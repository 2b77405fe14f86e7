"""WebDataset tar shards as data: indexed like the folder they were written from, read bit for bit
as its files by both loaders, through dump, train and eval; damaged shards and members named.
The index cache has its own tests (test_shard_cache.py)."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import zarr
from file_edits import same_size_other_png
from test_data import INTERIOR_MAX_GREY, MEAN_GREY
from test_data import _load as load_views
from test_dump import run_cli

import fastkd.data.shard_cache
import fastkd.data.shards
from fastkd.augment import AugmentConfig
from fastkd.data import (
    BadImageError,
    DatasetError,
    ImageDataset,
    content_hashes,
    open_dataset,
)
from fastkd.views import all_views

if TYPE_CHECKING:
    from digits_pool import PoolMember

pytest_plugins = ("digits_pool",)

SHARDS = 3
PATTERN = "digits-{000000..000002}.tar"
CONFIG = {
    "input_size": [3, 24, 24],
    "interpolation": "bicubic",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
}

Member = tuple[str, bytes]  # (name in the tar, bytes)


def digit_samples(folder: Path) -> list[list[Member]]:
    """The folder's samples in its order, each as WebDataset members: ``<key>.png``, ``<key>.cls``."""
    dataset = open_dataset(folder)
    return [
        [
            (key, (folder / key).read_bytes()),
            (f"{key.removesuffix('.png')}.cls", str(label).encode()),
        ]
        for key, label in zip(dataset.keys, dataset.labels.tolist(), strict=True)
    ]


def write_tar(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(
    folder: Path, out: Path, edit: Callable[[list[list[Member]]], None] | None = None
) -> str:
    """The folder's samples in SHARDS consecutive tar shards (``edit`` may change them first):
    the brace pattern naming them."""
    samples = digit_samples(folder)
    if edit is not None:
        edit(samples)
    out.mkdir(parents=True, exist_ok=True)
    cuts = np.linspace(0, len(samples), SHARDS + 1).astype(int)
    for index in range(SHARDS):
        members = [m for sample in samples[cuts[index] : cuts[index + 1]] for m in sample]
        write_tar(out / f"digits-{index:06d}.tar", members)
    return str(out / PATTERN)


def _views(dataset: ImageDataset) -> dict[str, np.ndarray]:
    return all_views(0, np.arange(len(dataset)), 2, dataset.sizes, AugmentConfig())


def _load(dataset: ImageDataset, items: dict, backend: str, **kwargs) -> list:
    return load_views(dataset, items, [CONFIG], backend=backend, **kwargs)


def _images(batches: list) -> torch.Tensor:
    return torch.cat([b.images[0] for b in batches])


@pytest.fixture(scope="module")
def shards(digits_small: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(digits_small, tmp_path_factory.mktemp("shards"))


def _fresh_cache(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    """An empty cache folder for one test, which caches shards however recently written (the
    tests write them a moment before): the folder the cached indexes go to."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(folder))
    monkeypatch.setattr(fastkd.data.shard_cache, "RECENT_NS", 0)
    return folder / "shard-index"


def _assert_same_index(a: ImageDataset, b: ImageDataset) -> None:
    assert a.members.shards == b.members.shards
    assert_same_members(a, b)


def assert_same_members(a: ImageDataset, b: ImageDataset) -> None:
    """The same samples at the same places: keys, labels, member names, shards, offsets, sizes."""
    assert a.keys == b.keys and a.members.member == b.members.member
    for got, want in [
        (a.labels, b.labels),
        (a.members.shard, b.members.shard),
        (a.members.offset, b.members.offset),
        (a.members.size, b.members.size),
    ]:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# -- the index ----------------------------------------------------------------------------------


def test_shards_index_like_their_folder(digits_small: Path, shards: str) -> None:
    folder, sharded = open_dataset(digits_small), open_dataset(shards)
    assert sharded.keys == [key.removesuffix(".png") for key in folder.keys]  # WebDataset keys
    np.testing.assert_array_equal(sharded.labels, folder.labels)
    assert sharded.classes == [] and sharded.num_classes == 10 == folder.num_classes  # by index
    np.testing.assert_array_equal(sharded.file_sizes, folder.file_sizes)
    np.testing.assert_array_equal(sharded.sizes, folder.sizes)
    assert sharded.source == shards and len(sharded.members.shards) == SHARDS
    first = Path(shards).parent / "digits-000000.tar"
    assert sharded.name(0) == f"{first}:{folder.keys[0]}"
    assert sharded.read_bytes(7) == folder.path(7).read_bytes()
    samples = list(range(len(folder)))
    assert content_hashes(sharded, samples) == content_hashes(folder, samples)
    # one shard, named as a plain .tar, is a data set too
    assert open_dataset(first).keys == sharded.keys[: len(open_dataset(first))]


def test_large_shard_sets_are_scanned_in_processes(
    shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    threads = open_dataset(shards)
    _fresh_cache(monkeypatch, tmp_path)  # nothing cached: scanned again
    monkeypatch.setattr(fastkd.data.shards, "_PROCESS_BYTES", 0)  # as if they were large
    monkeypatch.setattr(fastkd.data.shards, "_scan_cores", lambda: 2)
    started = []
    real_pool = fastkd.data.shards.ProcessPoolExecutor

    def pool(workers: int, **kwargs) -> object:
        started.append(workers)
        return real_pool(workers, **kwargs)

    monkeypatch.setattr(fastkd.data.shards, "ProcessPoolExecutor", pool)
    processes = open_dataset(shards)
    assert started == [2] and processes.name(59) == threads.name(59)
    _assert_same_index(processes, threads)


def _edited(folder: Path, out: Path, edit: Callable[[list[list[Member]]], None]) -> str:
    return write_shards(folder, out, edit)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[25].pop(1), r"digits-000001\.tar: key '4/\w+' \(4/\w+\.png\) has no \.cls"),
        (lambda s: s[25].pop(0), r"digits-000001\.tar: key '4/\w+' has no image member"),
        (lambda s: s[3].append((s[3][0][0][:-3] + "jpg", b"x")), r"key '0/\w+' has two images"),
        (lambda s: s[3].__setitem__(1, (s[3][1][0], b"three")), r"\.cls: label 'three' is not a"),
        (lambda s: s.append(s[2]), r"key '0/\w+' is in shard .*000000\.tar and in shard .*000002"),
    ],
    ids=["no-cls", "no-image", "two-images", "bad-cls", "key-in-two-shards"],
)
def test_bad_samples_are_named(digits_small: Path, tmp_path: Path, edit, message: str) -> None:
    pattern = _edited(digits_small, tmp_path, edit)
    with pytest.raises(DatasetError, match=message):
        open_dataset(pattern)


def test_missing_compressed_and_cut_shards_are_named(shards: str, tmp_path: Path) -> None:
    here = Path(shards).parent
    with pytest.raises(
        DatasetError, match=r"shard .*digits-000003\.tar does not exist \(2 of the 5 shards"
    ):
        open_dataset(here / "digits-{000000..000004}.tar")
    with pytest.raises(DatasetError, match=r"names shard .*digits-000001\.tar more than once"):
        open_dataset(here / "digits-{000000,000001,000001}.tar")
    with pytest.raises(DatasetError, match=r"x\.tar\.gz is a compressed tar.*decompress"):
        open_dataset(tmp_path / "x.tar.gz")
    with pytest.raises(DatasetError, match=r"--root is only for file lists"):
        open_dataset(shards, root=tmp_path)
    gzipped = tmp_path / "gz.tar"  # compressed, whatever its name says
    gzipped.write_bytes(gzip.compress((here / "digits-000000.tar").read_bytes()))
    with pytest.raises(DatasetError, match=r"gz\.tar is gzip-compressed"):
        open_dataset(gzipped)

    whole = (here / "digits-000000.tar").read_bytes()
    with tarfile.open(here / "digits-000000.tar") as tar:
        members = tar.getmembers()
    cuts = {
        "in a member's data": members[4].offset_data + 10,
        "in a header": members[4].offset + 100,
        "at a member's end, no end blocks": members[4].offset,
    }
    for where, cut in cuts.items():
        cut_shard = tmp_path / "cut.tar"
        cut_shard.write_bytes(whole[:cut])
        with pytest.raises(DatasetError, match=rf"shard {re.escape(str(cut_shard))} is truncated"):
            open_dataset(cut_shard)
            pytest.fail(where)


def test_labels_with_padding_and_keys_with_dots(digits_small: Path, tmp_path: Path) -> None:
    """A .cls is read whole (a long padded one, a BOM); images hidden by a dot in their key are
    refused by name, never dropped; a stream spec and a folder of shards get a way out."""

    def padded(samples: list[list[Member]]) -> None:
        samples[3][1] = (samples[3][1][0], b" " * 100 + b"7\n")
        samples[4][1] = (samples[4][1][0], "\ufeff8".encode())

    dataset = open_dataset(_edited(digits_small, tmp_path / "padded", padded))
    assert dataset.labels[3] == 7 and dataset.labels[4] == 8

    def dotted(samples: list[list[Member]]) -> None:
        samples[5] = [(name.replace("/", "/img.", 1), data) for name, data in samples[5]]

    with pytest.raises(
        DatasetError, match=r"member 0/img\.\w+\.png is not an image.*key is '0/img'"
    ):
        open_dataset(_edited(digits_small, tmp_path / "dotted", dotted))
    for stream in ("pipe:curl -s https://host/train-000000.tar", "https://host/train-{0..3}.tar"):
        with pytest.raises(DatasetError, match=r"is a stream: .* local"):
            open_dataset(stream)
    (tmp_path / "flat").mkdir()
    write_tar(tmp_path / "flat" / "a.tar", [])
    with pytest.raises(DatasetError, match=r"for its 1 tar shard\(s\) give a \.tar or a brace"):
        open_dataset(tmp_path / "flat")


def test_short_reads_are_completed(shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network file system may return fewer bytes than asked: read on to the member's end."""
    dataset = open_dataset(shards)
    whole = dataset.read_bytes(7)
    real_pread = fastkd.data.shards.os.pread
    monkeypatch.setattr(
        fastkd.data.shards.os, "pread", lambda fd, n, at: real_pread(fd, min(n, 100), at)
    )
    assert len(whole) > 300 and dataset.read_bytes(7) == whole


# -- the loaders --------------------------------------------------------------------------------


def test_both_backends_read_shards_as_the_folder(digits_small: Path, shards: str) -> None:
    """torch on shards == torch on the folder, bit for bit (the same bytes, decoded alike); so
    for DALI; and DALI agrees with torch on shards within test_data's stated tolerance."""
    folder, sharded = open_dataset(digits_small), open_dataset(shards)
    items = _views(folder)
    torch_folder = _load(folder, items, "torch", batch_size=7, breaks=[20])
    torch_shards = _load(sharded, items, "torch", batch_size=7, breaks=[20], num_workers=2)
    assert torch.equal(_images(torch_shards), _images(torch_folder))
    for a, b in zip(torch_shards, torch_folder, strict=True):
        assert a.samples.tolist() == b.samples.tolist() and a.views.tolist() == b.views.tolist()
        np.testing.assert_array_equal(a.file_hashes, b.file_hashes)

    pytest.importorskip("nvidia.dali")
    dali_shards = _load(sharded, items, "dali", num_workers=2)
    assert torch.equal(_images(dali_shards), _images(_load(folder, items, "dali", num_workers=2)))
    assert torch.cat([b.samples for b in dali_shards]).tolist() == items["samples"].tolist()
    np.testing.assert_array_equal(
        np.concatenate([b.file_hashes for b in dali_shards]),
        np.concatenate([b.file_hashes for b in torch_shards]),
    )
    grey = (_images(dali_shards) - _images(torch_shards)).abs() * 0.5 * 255  # std 0.5
    assert grey.mean() < MEAN_GREY
    assert grey[..., 1:-1, 1:-1].max() <= INTERIOR_MAX_GREY + 1e-3


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_corrupt_member_is_named_or_skipped(
    digits_small: Path, shards: str, tmp_path: Path, backend: str
) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    bad = 23  # in the second shard

    def cut_pixels(samples: list[list[Member]]) -> None:
        name, data = samples[bad][0]
        samples[bad][0] = (name, data[:80])  # header intact, pixels cut off

    broken = open_dataset(_edited(digits_small, tmp_path, cut_pixels))
    member = broken.name(bad)
    assert member.endswith(f"digits-000001.tar:{broken.keys[bad]}.png")
    items = _views(broken)
    with pytest.raises(BadImageError, match=rf"{re.escape(member)} \(sample {bad}\)"):
        _load(broken, items, backend)

    batches = _load(broken, items, backend, on_bad_image="skip")
    skipped = {s: why for b in batches for s, why in b.skipped.items()}
    assert list(skipped) == [bad] and "truncated" in skipped[bad]
    keep = items["samples"] != bad
    assert torch.cat([b.samples for b in batches]).tolist() == items["samples"][keep].tolist()
    clean = _load(open_dataset(shards), items, backend)
    assert torch.equal(_images(batches), _images(clean)[torch.from_numpy(keep)])


# -- the commands -------------------------------------------------------------------------------


def _dump_args(data: str, pool: list[PoolMember], out: Path, *extra: str) -> list[str]:
    models = [arg for member in pool for arg in ("--model", member.spec)]
    return [
        *("dump", "--data", data, *models, "--out", str(out), "--views", "1"),
        *("--batch-size", "16", "--samples-per-shard", "16", "--workers", "0"),
        *("--backend", "torch", "--no-progress", *extra),
    ]


def _rewrite_member(pattern: str, shard: int, index: int, change: Callable[[bytes], bytes]) -> str:
    """Rewrite one shard with its ``index``-th member's bytes changed: the member's name."""
    path = Path(pattern).parent / f"digits-{shard:06d}.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    name, data = members[index]
    members[index] = (name, change(data))
    write_tar(path, members)
    return f"{path}:{name}"


def _first_per_class(folder: Path, out: Path, count: int) -> Path:
    """A class folder of the first ``count`` images of each class: a smaller data set."""
    for images in sorted(folder.iterdir()):
        (out / images.name).mkdir(parents=True)
        for image in sorted(images.iterdir())[:count]:
            shutil.copy(image, out / images.name / image.name)
    return out


def test_dump_train_and_eval_on_shards(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    small = _first_per_class(digits_small, tmp_path / "small", 2)  # 20 images: CPU time
    data = write_shards(small, tmp_path / "shards")
    store, pool = tmp_path / "store.zarr", digit_pool[:1]  # one model, one view: CPU time
    run_cli(_dump_args(data, pool, store))
    group = zarr.open_group(store, mode="r")
    assert group["keys"][:].tolist() == open_dataset(data).keys  # the members' WebDataset keys
    assert group.attrs["fastkd_status"]["complete"]
    resumed = run_cli(_dump_args(data, pool, store))  # the same shards: no work
    assert "0 blocks to write, 2 already done" in resumed

    convnext = digit_pool[0]
    student = f"s:{convnext.arch}={convnext.checkpoint}"
    train = [*("train", "--data", data, "--store", str(store), "--student", student)]
    train += [*("--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--backend", "torch")]
    val = Path(data).parent / "digits-000002.tar"  # one shard: digits 7-9, so 10 classes
    train += ["--workers", "0", "--no-progress", "--val-data", str(val)]
    run_cli([*train, "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "s.pt").is_file()

    folder_top1 = tmp_path / "folder"
    evaluate = ["eval", "--model", convnext.spec, "--backend", "torch", "--out"]
    shown = run_cli([*evaluate, str(tmp_path / "eval"), "--data", data])
    assert "Top-1 on 20 samples of" in shown  # the title wraps the pattern
    run_cli([*evaluate, str(folder_top1), "--data", str(small)])
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report == json.loads((folder_top1 / "report.json").read_text())

    # A member rewritten at its size: the fingerprint (keys, sizes) passes, its content hash not.
    def other(png: bytes) -> bytes:
        (tmp_path / "x.png").write_bytes(png)
        return same_size_other_png(tmp_path / "x.png")

    changed = _rewrite_member(data, 1, 2, other)  # member 2: the shard's 2nd sample's image
    refused = run_cli([*train, "--out", str(tmp_path / "run2")], expect_code=2)
    assert "changed since the dump" in refused and changed in refused

    # A member resized: a store made from the shards refuses them, in train and in dump.
    _rewrite_member(data, 1, 2, lambda png: png + b"\0" * 16)
    refused = run_cli([*train, "--out", str(tmp_path / "run3")], expect_code=2)
    assert "fingerprint: store has" in refused
    refused = run_cli(_dump_args(data, pool, store), expect_code=2)
    assert "fingerprint: store has" in refused


def test_dump_names_a_garbage_member_or_skips_it(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    data = write_shards(digits_small, tmp_path / "shards")
    garbage = _rewrite_member(data, 2, 10, lambda _: b"definitely not a png")
    key = garbage.rpartition(":")[2].removesuffix(".png")
    store = tmp_path / "store.zarr"
    failed = run_cli(_dump_args(data, digit_pool[:1], store), expect_code=2)
    assert f"cannot read image {garbage} (sample" in failed and "--on-bad-image skip" in failed
    run_cli(_dump_args(data, digit_pool[:1], store, "--on-bad-image", "skip"))
    assert zarr.open_group(store, mode="r").attrs["fastkd_status"]["skipped"] == [key]


def test_a_cut_shard_is_one_line_naming_it(digits_small: Path, tmp_path: Path) -> None:
    data = write_shards(digits_small, tmp_path / "shards")
    shard = Path(data).parent / "digits-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    for command in ("dump", "eval"):
        args = [command, "--data", data, "--model", "resnet18=x.pt", "--out", str(tmp_path / "o")]
        output = run_cli(args, expect_code=2)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"shard {shard} is truncated" in errors[0], output
        assert "Traceback" not in output
