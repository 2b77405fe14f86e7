"""Labels are plain bounded integers (``fastkd.data.labels``), read by one rule in file lists and
shard ``.cls`` members; no class list is built from the largest label, so a label just below the
bound opens in little memory and then meets the model's class count in one line."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image
from test_dump import run_cli
from test_shards import write_tar

import fastkd.data.shard_cache as shard_cache
from fastkd.data import DatasetError, open_dataset
from fastkd.data.labels import MAX_CLASSES
from fastkd.errors import StoreMismatchError
from fastkd.store import MANIFEST_ATTR, StoreReader

IMAGES = ("a.png", "b.png", "c.png", "d.png")
# Refused: not plain ASCII decimals ('²' passes str.isdigit, '٣' is read by int as 3), or not
# below the bound (1e11 used to build a list of 10^11 class names).
REFUSED = ["1e11", "100000000000", "²", "-1", "+3", "٣", "3.0", str(MAX_CLASSES)]
ACCEPTED = {" 7 ": 7, "0007": 7, str(MAX_CLASSES - 1): MAX_CLASSES - 1}  # leading zeros: decimal
OPEN_BYTES = 50 << 20  # opening a data set whose largest label is MAX_CLASSES - 1
T = TypeVar("T")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Four 16 px images and an untrained 10-class timm model (a plain state dict)."""
    root = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(0)
    for name in IMAGES:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_convnext", num_classes=10).state_dict(), root / "m.pt")
    return SimpleNamespace(root=root, spec=f"test_convnext={root / 'm.pt'}")


def file_list(path: Path, labels: list[str]) -> Path:
    """A file list of the first images with these labels (line i + 1: image i); ``path`` is in
    the images' folder."""
    lines = [f"{name} {label}" for name, label in zip(IMAGES, labels, strict=False)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def shard(tiny: SimpleNamespace, path: Path, labels: list[str]) -> Path:
    """A WebDataset shard of the first images (key ``a``, ...), each with its ``.cls``."""
    members = []
    for name, label in zip(IMAGES, labels, strict=False):
        key = name.removesuffix(".png")
        members += [(name, (tiny.root / name).read_bytes()), (f"{key}.cls", label.encode())]
    return write_tar(path, members)


def peak_bytes(action: Callable[[], T]) -> tuple[T, int]:
    """What ``action`` returns, and the peak of the Python heap (numpy's arrays too) during it."""
    tracemalloc.start()
    try:
        return action(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize("label", REFUSED)
def test_refused_labels_end_the_dump_in_one_line_naming_line_and_member(
    tiny: SimpleNamespace, tmp_path: Path, label: str
) -> None:
    listed = file_list(tiny.root / f"list-{REFUSED.index(label)}.txt", ["0", label])
    sharded = shard(tiny, tmp_path / "s.tar", ["0", label])
    for data, where in [(listed, f"{listed}:2: label "), (sharded, f"{sharded}:b.cls: label ")]:
        args = ["dump", "--data", str(data), "--model", tiny.spec, "--out", str(tmp_path / "o")]
        line = error_line(run_cli(args, expect_code=2))
        assert where in line and label.strip() in line, line
        assert f"below {MAX_CLASSES:,}" in line, line  # the bound, stated
        with pytest.raises(DatasetError, match=f"^{re.escape(where)}"):  # the library's own error
            open_dataset(data)


@pytest.mark.parametrize(("label", "value"), ACCEPTED.items())
def test_accepted_labels_keep_a_class_count_and_no_names(
    tiny: SimpleNamespace, tmp_path: Path, label: str, value: int
) -> None:
    listed = file_list(tiny.root / f"ok-{value}.txt", ["0", label])
    for data in (listed, shard(tiny, tmp_path / "s.tar", ["0", label])):
        dataset = open_dataset(data)
        assert dataset.labels.tolist() == [0, value]
        assert dataset.num_classes == value + 1 and dataset.classes == []  # named by index


def test_a_label_below_the_bound_opens_in_little_memory(
    tiny: SimpleNamespace, tmp_path: Path
) -> None:
    top = str(MAX_CLASSES - 1)
    for data in (
        file_list(tiny.root / "top.txt", ["0", top]),
        shard(tiny, tmp_path / "top.tar", ["0", top]),
    ):
        dataset, peak = peak_bytes(lambda data=data: open_dataset(data))
        assert dataset.num_classes == MAX_CLASSES
        assert peak < OPEN_BYTES, f"{data}: {peak / 2**20:.0f} MiB to open"


@pytest.mark.parametrize("command", ["dump", "eval"])
def test_a_huge_label_meets_the_models_classes_in_one_line(
    tiny: SimpleNamespace, tmp_path: Path, command: str
) -> None:
    top = str(MAX_CLASSES - 1)
    for data in (
        file_list(tiny.root / "huge.txt", ["0", "3", top]),
        shard(tiny, tmp_path / "huge.tar", ["0", "3", top]),
    ):
        args = [command, "--data", str(data), "--model", tiny.spec, "--out", str(tmp_path / "o")]
        output, peak = peak_bytes(lambda args=args: run_cli(args, expect_code=2))
        assert peak < OPEN_BYTES, f"{command} {data}: {peak / 2**20:.0f} MiB"  # nothing per class
        line = error_line(output)
        assert "10 classes, " in line and f"has {MAX_CLASSES}" in line, line
        if command == "dump":  # which sample holds the label that made the count
            assert f"largest label is {top}, of " in line and "c.png" in line, line


def test_stores_of_file_lists_keep_opening_by_class_count(
    tiny: SimpleNamespace, tmp_path: Path
) -> None:
    """A store from a file list records no class names; one dumped while file lists named
    their classes "0".."9" opens for training all the same; the count is still checked."""
    listed = file_list(tiny.root / "ten.txt", ["0", "3", "9", "9"])
    store = tmp_path / "store"
    dump = [
        *("dump", "--data", str(listed), "--model", tiny.spec, "--out", str(store)),
        *("--views", "1", "--batch-size", "4", "--workers", "0", "--backend", "torch"),
        "--no-progress",
    ]
    run_cli(dump)
    group = zarr.open_group(store, mode="r+")
    manifest = group.attrs[MANIFEST_ATTR]
    assert manifest["classes"] == [] and manifest["num_classes"] == 10
    assert StoreReader.for_data(store, open_dataset(listed)).num_samples == len(IMAGES)
    group.attrs[MANIFEST_ATTR] = {
        **manifest,
        "classes": [str(c) for c in range(10)],
    }  # the old form
    assert StoreReader.for_data(store, open_dataset(listed)).num_samples == len(IMAGES)
    output = run_cli(dump)  # and the dump that made it resumes it (nothing left to do)
    assert "0 blocks to write, 1 already done" in " ".join(output.split()), output

    relabelled = file_list(tiny.root / "eleven.txt", ["0", "3", "10", "9"])
    with pytest.raises(StoreMismatchError, match=r"num_classes: store has 10, expected 11"):
        StoreReader.for_data(store, open_dataset(relabelled))
    huge = file_list(tiny.root / "huge-train.txt", ["0", "3", str(MAX_CLASSES - 1), "9"])
    args = ["train", "--data", str(huge), "--store", str(store), "--student", tiny.spec]
    output = run_cli([*args, "--out", str(tmp_path / "run")], expect_code=2)
    assert f"{store} does not match" in error_line(output)  # its fields listed below it
    assert f"num_classes: store has 10, expected {MAX_CLASSES}\n" in output, output


def test_a_cached_scan_from_before_the_bound_is_scanned_again(
    tiny: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard index cache kept labels as they were read: one beyond the bound is not trusted."""
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(shard_cache, "RECENT_NS", 0)
    sharded = shard(tiny, tmp_path / "old.tar", ["0", "100000000000"])
    scan = shard_cache.ShardScan(
        keys=["a", "b"],
        names=["a.png", "b.png"],
        offsets=np.asarray([512, 2048], dtype=np.int64),
        sizes=np.asarray([10, 10], dtype=np.int64),
        labels=np.asarray([0, 100_000_000_000], dtype=np.int64),
    )
    cache = shard_cache.cache_dir()
    identity = shard_cache.ShardIdentity.of(sharded)
    assert shard_cache.write_cached(cache, identity, scan) is None
    assert shard_cache.read_cached(cache, sharded) is not None  # what an older fastkd wrote
    with pytest.raises(
        DatasetError, match=rf"^{re.escape(str(sharded))}:b\.cls: label 100000000000 is too large"
    ):
        open_dataset(sharded)
