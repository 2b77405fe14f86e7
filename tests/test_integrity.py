"""Fault injection on a finished store: every deleted, truncated or altered shard is found by
its block's content hash, named (array, block, samples, file) and never read as zeros or garbage.

The dump-level half (``fastkd inspect --verify``, ``fastkd dump --repair`` rewriting exactly the
damaged blocks, bit for bit) is in test_dump.py, beside the digits dump it damages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import PER_SHARD, create, data, write  # noqa: F401 (fixture)

from fastkd.store import StoreError, StoreReader, check_store
from fastkd.store.integrity import shard_file


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, data: dict) -> Path:  # noqa: F811
    path = tmp_path_factory.mktemp("pristine") / "s"
    with create(path, data) as writer:
        write(writer, data)
    return path


@pytest.fixture
def store(tmp_path: Path, pristine: Path) -> Path:
    path = tmp_path / "s"
    shutil.copytree(pristine, path)
    return path


def shard(store: Path, array: str, block: int) -> Path:
    file = Path(shard_file(store, zarr.open_group(store, mode="r")[array], block))
    assert file.is_file(), file
    return file


def rows_of(block: int) -> tuple[np.ndarray, np.ndarray]:
    samples = np.arange(block * PER_SHARD, (block + 1) * PER_SHARD)
    return samples, np.zeros_like(samples)


def test_a_pristine_store_verifies(pristine: Path) -> None:
    assert check_store(pristine, progress=False) == []


def test_a_deleted_model_shard_is_named_not_read_as_zeros(store: Path) -> None:
    file = shard(store, "models/small/topk_logprobs", 1)
    file.unlink()
    reader = StoreReader(store)
    reader.read("small", *rows_of(0))  # other blocks read as before
    with pytest.raises(StoreError) as error:
        reader.read("small", *rows_of(1))
    message = str(error.value)
    assert "models/small/topk_logprobs, block 1 (samples 8-15)" in message
    assert f"file {file}: missing" in message and "--repair" in message
    (bad,) = check_store(store, progress=False)
    assert (bad.array, bad.block, bad.samples, Path(bad.file)) == (
        "models/small/topk_logprobs", 1, (8, 16), file,
    )  # fmt: skip


def test_flipped_bytes_are_found(store: Path) -> None:
    file = shard(store, "models/wide/true_logprob", 3)
    raw = bytearray(file.read_bytes())
    for offset in range(8, 24):  # inside the first chunk's compressed bytes
        raw[offset] ^= 0x5A
    file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"models/wide/true_logprob, block 3 \(samples 24-31\)"):
        StoreReader(store).read("wide", *rows_of(3))
    assert [(b.array, b.block) for b in check_store(store, progress=False)] == [
        ("models/wide/true_logprob", 3)
    ]


def test_a_truncated_shard_names_its_file(store: Path) -> None:
    file = shard(store, "boxes", 2)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(StoreError, match=rf"boxes, block 2 .*file {file}: cannot be decoded"):
        StoreReader(store).view_params(*rows_of(2))


def test_an_altered_value_is_found_even_when_it_decodes(store: Path) -> None:
    """A value rewritten through zarr (valid shard, valid checksum) still differs from its hash."""
    zarr.open_group(store, mode="r+")["models/small/topk_ids"][33, 0, 0] += 1
    with pytest.raises(StoreError, match=r"topk_ids, block 4 .*content differs"):
        StoreReader(store).read("small", *rows_of(4))


def test_damaged_labels_are_refused_on_open(store: Path) -> None:
    shard(store, "labels", 0).unlink()
    with pytest.raises(StoreError, match=r"labels, block 0 \(samples 0-7\).*missing"):
        StoreReader(store)
