"""What a store holds and what it costs on disk, for ``fastkd inspect`` and the benchmarks.

Reads the manifest and zarr's metadata of every array (shapes, stored bytes), never the data
itself beyond the keys and the skipped flags, so it works on a finished store or one still being
written. The manifest passes its schema on open and the arrays must agree with it (as the reader
checks), so a store edited by hand is refused in one message, never summarised from its claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from fastkd.storage import Location, as_location, storage_failure
from fastkd.store.arrays import DONE_ARRAY, META_DIR, SHARED_ARRAYS, check_arrays
from fastkd.store.encoding import model_arrays
from fastkd.store.manifest import Manifest, StoreLayout, open_group, open_manifest


@dataclass
class ArraySummary:
    path: str  # inside the store, e.g. models/resnet18/topk_logprobs
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # decoded
    nbytes_stored: int  # on disk, compressed, sharding index included


@dataclass
class StoreSummary:
    manifest: Manifest
    layout: StoreLayout
    blocks_done: int
    arrays: list[ArraySummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    num_files: int = 0
    unreadable: list[str] = field(default_factory=list)  # per-sample arrays that do not decode

    def bytes_per_view(self, model: str | None = None) -> float:
        """Stored bytes per (sample, view) of one model's arrays (None: the shared arrays)."""
        prefix = f"models/{model}/" if model else None
        total = sum(
            a.nbytes_stored
            for a in self.arrays
            if (a.path.startswith(prefix) if prefix else not a.path.startswith("models/"))
        )
        return total / (self.manifest.num_samples * self.manifest.views)

    @property
    def compression_ratio(self) -> float:
        stored = sum(a.nbytes_stored for a in self.arrays)
        return sum(a.nbytes for a in self.arrays) / max(1, stored)


def summarize(path: Path | str | Location) -> StoreSummary:
    """Manifest, array sizes and stored bytes of a store (finished or not)."""
    path = as_location(path)
    manifest, layout = open_manifest(path)
    group = open_group(path, mode="r")
    check_arrays(path, group, manifest, layout)
    names = [*SHARED_ARRAYS] + [
        f"models/{m.name}/{a}" for m in manifest.models for a in model_arrays(m, manifest.views)
    ]
    arrays = []
    keys, skipped_mask = _read_whole(group, "keys"), _read_whole(group, "skipped")
    unreadable = [
        name for name, values in (("keys", keys), ("skipped", skipped_mask)) if values is None
    ]
    for name in names:
        array = group[name]
        if name == "keys":  # variable length: the UTF-8 bytes of all keys
            nbytes = sum(len(str(k).encode()) for k in keys) if keys is not None else 0
        else:
            nbytes = math.prod(array.shape) * array.dtype.itemsize
        arrays.append(
            ArraySummary(name, tuple(array.shape), str(array.dtype), nbytes, array.nbytes_stored())
        )
    skipped = []
    if keys is not None and skipped_mask is not None:
        skipped = [str(keys[int(s)]) for s in np.flatnonzero(skipped_mask)]
    return StoreSummary(
        manifest=manifest,
        layout=layout,
        blocks_done=int(group[DONE_ARRAY][:].sum()),
        arrays=arrays,
        skipped=skipped,
        num_files=sum(1 for rel, _ in path.files() if not rel.startswith(f"{META_DIR}/")),
        unreadable=unreadable,
    )


def _read_whole(group: zarr.Group, name: str) -> np.ndarray | None:
    """A per-sample array read whole, or None when a shard of it cannot be decoded (a damaged
    store: ``integrity.check_store`` names the block)."""
    try:
        return group[name][:]
    except Exception as error:  # zarr and its codecs raise many types for a damaged shard
        failure = storage_failure(error)
        if failure is not None:  # a server that stopped answering: no damage to report
            raise failure from error
        return None
