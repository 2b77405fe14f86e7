"""Integrity of every stored byte: a content hash per block of every array, checked on read.

Zarr checksums only a shard's index, so a deleted shard reads back as fill values and flipped
bytes inside a chunk can decode to other numbers. The writer therefore records, with each block's
done marker, an xxh3-64 hash of every array's decoded values in that block (``BLOCK_HASHES``,
one row a block, columns in ``hashed_arrays`` order). The reader checks each block of the arrays
it decodes against its row (one hash per decoded block: hashing runs far faster than the
decompression it follows); ``verify_store`` checks every done block (``fastkd inspect --verify``)
and names the bad ones, which ``fastkd dump --repair`` rewrites. Both also hold the stored class
ids to the manifest's classes, and ``check_store`` first checks the arrays against the manifest
as the reader does on open (``arrays.check_arrays``), so a store that verifies is one training
reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from fastkd.errors import StoreError
from fastkd.hashing import content_hash
from fastkd.storage import Location, ObjectLocation, as_location, storage_failure
from fastkd.store.arrays import BLOCK_HASHES, DONE_ARRAY, check_arrays, hashed_arrays
from fastkd.store.manifest import Manifest, StoreLayout, open_group, open_manifest

CLASS_ID_ARRAYS = ("topk_ids", "tail_ids")  # a model's arrays of class ids: below num_classes


def digest(values: np.ndarray) -> int:
    """The content hash of a block's decoded values (strings: their UTF-8, one per line)."""
    if values.dtype.kind in "OUT":
        return content_hash("\n".join(str(v) for v in values.tolist()).encode())
    return content_hash(np.ascontiguousarray(values).view(np.uint8).data)


def shard_file(store: Path | str | Location, array: zarr.Array, block: int) -> Location:
    """The file (object) holding ``block`` of an array stored one shard (or chunk) per block."""
    coords = (block,) + (0,) * (array.ndim - 1)
    return as_location(store) / array.path / array.metadata.encode_chunk_key(coords)


@dataclass(frozen=True)
class BadBlock:
    """A done block of one array whose content is not what its writer recorded."""

    array: str
    block: int
    samples: tuple[int, int]  # [start, stop)
    file: Location
    reason: str

    def describe(self) -> str:
        return (
            f"{self.array}, block {self.block} (samples {self.samples[0]}-{self.samples[1] - 1}), "
            f"file {self.file}: {self.reason}"
        )


def read_block(
    store: Path | str | Location,
    array: zarr.Array,
    name: str,
    block: int,
    samples: tuple[int, int],
    expected: int,
) -> tuple[np.ndarray | None, BadBlock | None]:
    """Decode one block of ``array`` and check it: (values, None), or (None, why it is bad)."""
    file = shard_file(store, array, block)
    try:
        values = array[samples[0] : samples[1]]
    except Exception as error:  # zarr's checksum, codec and I/O errors: all mean a bad shard
        failure = storage_failure(error)
        if failure is not None:  # but a server that stopped answering is no damaged block
            raise failure from error
        reason = f"cannot be decoded ({type(error).__name__}: {error})"
        return None, BadBlock(name, block, samples, file, reason)
    if digest(values) == expected:
        return values, None
    reason = "missing" if not file.exists() else "content differs from what was written"
    return None, BadBlock(name, block, samples, file, reason)


def lost_hash_blocks(done: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """The done blocks whose hash row is all zero: it is written before the block's marker, so
    its file was lost since."""
    return np.flatnonzero(done & ~hashes.any(axis=1))


def out_of_range(values: np.ndarray, limit: int) -> tuple[int, int] | None:
    """The first (row, value) of ``values`` outside ``[0, limit)``, or None: one max and one min
    pass when every value is in range."""
    if not values.size or (values.max() < limit and values.min() >= 0):
        return None
    bad = (values >= limit) | (values < 0)
    return int(np.argwhere(bad)[0][0]), int(values[bad].flat[0])


def class_id_limits(manifest: Manifest) -> dict[str, int]:
    """Array path -> its model's class count, for each path a model's class ids may be stored
    under (a dense model has none of them)."""
    return {
        f"models/{entry.name}/{name}": entry.num_classes
        for entry in manifest.models
        for name in CLASS_ID_ARRAYS
    }


def damaged(bad: BadBlock, store: Path | str | Location) -> StoreError:
    """The error for a bad block met while reading: what, where, and the CLI way out."""
    return StoreError(
        f"store {store} is damaged: {bad.describe()}; rewrite the damaged blocks with the same "
        "`fastkd dump` command and --repair (`fastkd inspect --verify` lists them all)"
    )


def verify_store(
    path: Path | str | Location,
    manifest: Manifest,
    layout: StoreLayout,
    blocks: list[int] | None = None,
) -> Iterator[BadBlock | int]:
    """Check every done block (or ``blocks``) of every array, its class ids too: yields each bad
    (array, block) as a ``BadBlock`` and, after each block, the block's number (for progress).

    On object storage ``concurrency`` blocks are checked at once (each is a few requests), in
    order of their numbers all the same."""
    path = as_location(path)
    group = open_group(path, mode="r")
    done = group[DONE_ARRAY][:].astype(bool)
    hashes = group[BLOCK_HASHES][:]
    lost = set(lost_hash_blocks(done, hashes).tolist())
    names = hashed_arrays(manifest)
    arrays = [group[name] for name in names]
    limits = class_id_limits(manifest)

    def check(block: int) -> list[BadBlock]:
        start, stop = layout.block_samples(block, manifest.num_samples)
        if block in lost:
            file = shard_file(path, group[BLOCK_HASHES], block)
            reason = "the block's hashes are lost"
            return [BadBlock(BLOCK_HASHES, block, (start, stop), file, reason)]
        found_bad = []
        for column, (name, array) in enumerate(zip(names, arrays, strict=True)):
            expected = int(hashes[block, column])
            values, bad = read_block(path, array, name, block, (start, stop), expected)
            found = None
            if values is not None and name in limits:
                found = out_of_range(values, limits[name])
            if found is not None:
                row, value = found
                reason = (
                    f"sample {start + row} holds class id {value}, outside the manifest's "
                    f"{limits[name]} classes"
                )
                bad = BadBlock(name, block, (start, stop), shard_file(path, array, block), reason)
            if bad is not None:
                found_bad.append(bad)
        return found_bad

    todo = done_blocks(done, blocks)
    workers = path.options.concurrency if isinstance(path, ObjectLocation) else 1
    if workers == 1:
        for block in todo:
            yield from check(block)
            yield block
        return
    pool = ThreadPoolExecutor(workers, "fastkd-verify")
    try:
        for block, found_bad in zip(todo, pool.map(check, todo), strict=True):
            yield from found_bad
            yield block
    finally:  # an error (or a caller that stops early) leaves no block being checked behind
        pool.shutdown(wait=True, cancel_futures=True)


def done_blocks(done: np.ndarray, blocks: list[int] | None = None) -> list[int]:
    """The written blocks (``done`` markers), of ``blocks`` when given."""
    selected = range(done.size) if blocks is None else blocks
    return [int(b) for b in selected if done[b]]


def check_store(
    path: Path | str | Location, blocks: list[int] | None = None, progress: bool = True
) -> list[BadBlock]:
    """``verify_store`` of the store at ``path`` (every done block, or ``blocks``) with a
    progress bar: the damaged (array, block) pairs, none when every byte is as written."""
    from fastkd.runtime import progress_bar  # rich only: the store stays free of torch

    path = as_location(path)
    manifest, layout = open_manifest(path)
    group = open_group(path, mode="r")
    check_arrays(path, group, manifest, layout)
    done = group[DONE_ARRAY][:].astype(bool)
    total = len(done_blocks(done, blocks))
    bad: list[BadBlock] = []
    with progress_bar("blocks", enabled=progress) as bar:
        task = bar.add_task(f"verify {path.name}", total=total)
        for found in verify_store(path, manifest, layout, blocks):
            if isinstance(found, BadBlock):
                bad.append(found)
            else:
                bar.advance(task)
    return bad
