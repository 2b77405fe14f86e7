"""The arrays of a store on disk: their names, shards, chunks and codecs, and creating a new store.

One place decides how every array is laid out (``docs/store-format.md`` describes the result for
plain-zarr readers): sharded along the sample axis, one shard (file) per block, so a block is
written as whole files and ranks writing different blocks never share one. The writer creates a
store here; the reader and the summary find its arrays by the names defined here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from fastkd.augment import AugmentConfig
from fastkd.errors import StoreError
from fastkd.storage import Location
from fastkd.store.encoding import model_arrays
from fastkd.store.manifest import MANIFEST_ATTR, Manifest, StoreLayout, open_group
from fastkd.views import view_boxes

ZSTD_LEVEL = 9  # inside blosc and for keys; decoding speed hardly depends on it

DONE_ARRAY = "blocks_done"  # one unsharded chunk per block: its completion marker
BLOCK_HASHES = "block_hashes"  # [block, array]: content hashes, written just before the marker
META_DIR = ".fastkd"  # inside the store, ignored by zarr: the creation lock and the claims


def shared_arrays(num_samples: int, views: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (shape, dtype) of the arrays every store has beside its models' (dtype None:
    chosen when the store is made: ``keys`` are strings, ``boxes`` uint16 or uint32 by the
    largest image)."""
    n, v = num_samples, views
    return {
        "keys": ((n,), None),
        "labels": ((n,), np.int64),
        "sizes": ((n, 2), np.int32),
        "boxes": ((n, v, 4), None),
        "flips": ((n, v), bool),
        "skipped": ((n,), bool),
        "file_hashes": ((n,), np.int64),
    }


SHARED_ARRAYS = tuple(shared_arrays(0, 0))


def hashed_arrays(manifest: Manifest) -> list[str]:
    """The arrays hashed per block (``fastkd.store.integrity``), in the column order of
    ``BLOCK_HASHES``: the shared ones, then each model's, in manifest order."""
    names = list(SHARED_ARRAYS)
    for entry in manifest.models:
        names += [f"models/{entry.name}/{name}" for name in model_arrays(entry, manifest.views)]
    return names


def _codecs(dtype: Any, views_innermost: bool) -> dict[str, Any]:
    """Codec chain of one array, spec codecs only (docs/store-format.md compares the options).

    Blosc-zstd with byte shuffle groups the bytes of like-typed values (the sign/exponent bytes of
    fp16/fp32, the high bytes of ids) before zstd. ``views_innermost`` first transposes a
    [sample, view, rank] chunk to [sample, rank, view], so the ids and logits of the views of one
    sample, which mostly agree, sit side by side. Strings: vlen-utf8 then zstd.
    """
    if dtype is str:
        return {"compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    codecs: dict[str, Any] = {
        "compressors": [
            BloscCodec(
                cname="zstd",
                clevel=ZSTD_LEVEL,
                shuffle="shuffle",
                typesize=np.dtype(dtype).itemsize,
            )
        ]
    }
    if views_innermost:
        codecs["filters"] = [TransposeCodec(order=(0, 2, 1))]
    return codecs


def _create_sharded(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    layout: StoreLayout,
    fill_value: Any = 0,
    views_innermost: bool = False,
) -> zarr.Array:
    """An array sharded along the sample axis: one shard (file) per block."""
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        shards=(layout.samples_per_shard, *shape[1:]),
        chunks=(layout.chunk_samples, *shape[1:]),
        fill_value=fill_value,
        **_codecs(dtype, views_innermost),
    )


def create_store(
    path: Path | Location,
    manifest: Manifest,
    layout: StoreLayout,
    keys: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray,
) -> None:
    """Write a new store: shared arrays, empty model arrays, markers, then the manifest last."""
    n, v = manifest.num_samples, manifest.views
    shared = shared_arrays(n, v)
    group = open_group(path, mode="a")
    _create_sharded(group, "keys", shared["keys"][0], str, layout, fill_value="")
    _create_sharded(group, "labels", *shared["labels"], layout)
    _create_sharded(group, "sizes", *shared["sizes"], layout)
    # Integer pixel boxes: exact, and 3x smaller stored than float32 fractions (4.4 vs 13 B/view).
    box_dtype = np.uint16 if sizes.max() <= np.iinfo(np.uint16).max else np.uint32
    _create_sharded(group, "boxes", shared["boxes"][0], box_dtype, layout)
    _create_sharded(group, "flips", *shared["flips"], layout, fill_value=False)
    _create_sharded(group, "skipped", *shared["skipped"], layout, fill_value=False)
    _create_sharded(group, "file_hashes", *shared["file_hashes"], layout)
    write_sample_rows(group, manifest, 0, n, keys, labels, sizes)
    models = group.create_group("models")
    for entry in manifest.models:
        member = models.create_group(entry.name)
        for name, (shape, dtype) in model_arrays(entry, v).items():
            ranked = len(shape) == 2  # [view, rank]: top-k, ids, draws, dense log-probabilities
            _create_sharded(member, name, (n, *shape), dtype, layout, views_innermost=ranked)
    group.create_array(
        DONE_ARRAY,
        shape=(layout.num_blocks,),
        chunks=(1,),
        dtype=np.uint8,
        fill_value=0,
        compressors=None,
    )
    hashed = len(hashed_arrays(manifest))
    group.create_array(  # one small file per block, like the markers: ranks never share one
        BLOCK_HASHES,
        shape=(layout.num_blocks, hashed),
        chunks=(1, hashed),
        dtype=np.int64,
        fill_value=0,
        compressors=None,
    )
    group.attrs[MANIFEST_ATTR] = {**manifest.to_dict(), "layout": asdict(layout)}


def write_sample_rows(
    group: zarr.Group,
    manifest: Manifest,
    start: int,
    stop: int,
    keys: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray,
) -> dict[str, np.ndarray]:
    """Write samples ``[start, stop)`` of the arrays fixed when a store is made (keys, labels,
    sizes and the view boxes and flips they imply) from the caller's values, never from disk:
    all of them at creation, a block's again with the block. ``keys``, ``labels`` and ``sizes``
    cover every sample of the store. Returns the rows written, in the stored dtypes."""
    rows = slice(start, stop)
    boxes, flips = view_boxes(
        manifest.seed,
        np.arange(start, stop),
        manifest.views,
        sizes[rows],
        AugmentConfig.from_dict(manifest.augment),
    )
    values = {
        "keys": np.asarray(keys[start:stop], dtype=object),
        "labels": labels[rows],
        "sizes": sizes[rows],
        "boxes": boxes,
        "flips": flips,
    }
    for name, rows_of_array in values.items():
        if name != "keys":
            values[name] = rows_of_array.astype(group[name].dtype, copy=False)
        group[name][rows] = values[name]
    return values


def array_differences(group: zarr.Group, manifest: Manifest, layout: StoreLayout) -> list[str]:
    """Every array the manifest implies, against the store's: missing ones, and shapes, dtypes or
    shards (samples per shard and per inner chunk, by the layout) that differ, each naming both
    values. An edited manifest (views, samples, models, top-k, classes, layout) would otherwise be
    read with the wrong layout: silently, as an IndexError, or as every block "damaged"."""
    n, v = manifest.num_samples, manifest.views
    markers = {
        DONE_ARRAY: ((layout.num_blocks,), np.uint8),
        BLOCK_HASHES: ((layout.num_blocks, len(hashed_arrays(manifest))), np.int64),
    }
    expected = dict(shared_arrays(n, v))
    for entry in manifest.models:
        for name, (shape, dtype) in model_arrays(entry, v).items():
            expected[f"models/{entry.name}/{name}"] = ((n, *shape), dtype)
    problems = []
    sharding: dict[str, list[str]] = {}  # one difference of the layout -> the arrays it is in
    for name, (shape, dtype) in {**expected, **markers}.items():
        try:
            array = group[name]
        except KeyError:
            problems.append(f"{name}: missing (the manifest implies shape {shape})")
            continue
        if tuple(array.shape) != shape:
            problems.append(
                f"{name}: shape {tuple(array.shape)} in the store, {shape} by the manifest"
            )
        if dtype is not None and np.dtype(array.dtype) != np.dtype(dtype):
            problems.append(
                f"{name}: dtype {np.dtype(array.dtype)} in the store, {np.dtype(dtype)} by the "
                "manifest"
            )
        for difference in _shard_differences(array, layout) if name in expected else ():
            sharding.setdefault(difference, []).append(name)
    for difference, names in sharding.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        problems.append(f"{', '.join(names[:3])}{more}: {difference}")
    return problems


def _shard_differences(array: zarr.Array, layout: StoreLayout) -> list[str]:
    """Samples per shard and per inner chunk of a per-sample array, against the layout's."""
    shard = array.shards[0] if array.shards else None
    out = []
    if shard != layout.samples_per_shard:
        out.append(
            f"shards of {shard} samples in the store, {layout.samples_per_shard} by the "
            "manifest's layout"
        )
    if array.chunks[0] != layout.chunk_samples:
        out.append(
            f"inner chunks of {array.chunks[0]} samples in the store, {layout.chunk_samples} "
            "by the manifest's layout"
        )
    return out


def check_arrays(path: Path | Location, group: zarr.Group, manifest: Manifest, layout: StoreLayout) -> None:
    """Refuse a store whose arrays disagree with its manifest (``array_differences``, naming
    each), before any array is read by what the manifest claims: the reader and ``fastkd
    inspect`` (with ``--verify`` too) check this on open."""
    disagree = array_differences(group, manifest, layout)
    if disagree:
        raise StoreError(
            f"store {path}: its arrays disagree with its manifest (edited, or another "
            f"store's): {'; '.join(disagree)}; dump again with --overwrite"
        )
