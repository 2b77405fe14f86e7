"""Reading a finished store: validated against what training expects, O(1) random access.

Training asks for any batch of (sample, view) rows, in random order. A zarr lookup costs
milliseconds, so the reader decodes whole shards (one block of an array) into a cache of decoded
blocks (``block_cache``) and gathers rows from it with numpy: a shuffled epoch decodes every shard
about once. What it returns is numpy (``ModelTargets``, ``PoolArrays``): the loss's tensor types
are training's business, not the store's.

Every block is checked as it is decoded: against the content hash its writer recorded
(``integrity``: a deleted, truncated or altered shard is an error naming the array, block,
samples and file, never zeros or garbage), and its top-k ids against the model's classes (one
numpy max over the block, in the reader's thread), so the kernels need not check them again on
the device. Opening a store reads and checks only the per-sample arrays it keeps whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastkd.compression import TailModel
from fastkd.errors import ConfigError, StoreError, StoreMismatchError
from fastkd.storage import Location, as_location, local_or_url
from fastkd.store.arrays import BLOCK_HASHES, DONE_ARRAY, check_arrays, hashed_arrays
from fastkd.store.block_cache import BlockCache
from fastkd.store.encoding import model_arrays
from fastkd.store.integrity import (
    CLASS_ID_ARRAYS,
    damaged,
    digest,
    lost_hash_blocks,
    read_block,
    shard_file,
)
from fastkd.store.manifest import Expectation, open_group, open_manifest
from fastkd.views import box_fractions

DEFAULT_CACHE_BYTES = 4 << 30  # reader: decoded blocks kept in memory, all models together


@dataclass
class ModelTargets:
    """Stored targets of one model for a batch of (sample, view) rows (numpy, stored dtypes)."""

    true_logprob: np.ndarray  # [b] fp32, log p(label) at T = 1, exact whatever the top-k
    logprobs: np.ndarray | None = None  # [b, C] fp16 (dense)
    topk_logprobs: np.ndarray | None = None  # [b, K] fp16, descending (sparse)
    topk_ids: np.ndarray | None = None  # [b, K] uint16 / uint32
    log_tail: np.ndarray | None = None  # [b] fp32, log of the mass outside the top-k and label
    log_tail_sqrt: np.ndarray | None = None  # [b] fp16, log of the sum of sqrt(p) there
    tail_ids: np.ndarray | None = None  # [b, S] sorted tail draws (sampled tail)


@dataclass
class PoolArrays:
    """Stored targets of several models for a batch of rows, stacked along a member axis (numpy):
    the fields of ``ModelTargets`` with a member axis after the row axis, and the pool's tail
    model (None when dense)."""

    true_logprob: np.ndarray  # [B, M]
    logprobs: np.ndarray | None = None  # [B, M, C]
    topk_logprobs: np.ndarray | None = None  # [B, M, K]
    topk_ids: np.ndarray | None = None  # [B, M, K]
    log_tail: np.ndarray | None = None  # [B, M]
    log_tail_sqrt: np.ndarray | None = None  # [B, M]
    tail_ids: np.ndarray | None = None  # [B, M, S]
    tail: TailModel | None = None  # the pool's tail model (None: dense)


class StoreReader:
    """Random access to a finished store, validated against what training expects.

    ``read`` and ``read_pool`` take any batch of (sample, view) rows; shards are decoded whole
    through zarr into a block cache (``cache_bytes`` in all) and indexed with numpy.
    """

    def __init__(
        self,
        path: Path | str | Location,
        expect: Expectation | None = None,
        *,
        allow_incomplete: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.location = as_location(path)
        self.path = local_or_url(self.location)  # messages name it; a Path when local
        self.manifest, self.layout = open_manifest(self.location)
        if expect is not None:
            problems = expect.differences(self.manifest)
            if problems:
                raise StoreMismatchError(
                    self.path, problems, "refusing targets made for other data or models"
                )
        self._group = open_group(self.location, mode="r")
        check_arrays(self.location, self._group, self.manifest, self.layout)
        self._done = self._group[DONE_ARRAY][:].astype(bool)
        if not self._done.all() and not allow_incomplete:
            pending = np.flatnonzero(~self._done)
            raise StoreError(
                f"store {self.path} is incomplete: {pending.size} of {self.layout.num_blocks} blocks "
                f"not written (first {pending[:5].tolist()}); finish the dump: run the same "
                "`fastkd dump` command again (it resumes)"
            )
        hashes = self._group[BLOCK_HASHES][:]
        lost = lost_hash_blocks(self._done, hashes)
        if lost.size:
            file = shard_file(self.location, self._group[BLOCK_HASHES], int(lost[0]))
            raise StoreError(
                f"store {self.path} is damaged: the content hashes of {lost.size} written "
                f"block(s) are lost (first block {int(lost[0])}, file {file}); rewrite those "
                "blocks with the same `fastkd dump` command and --repair"
            )
        self._hashes = dict(zip(hashed_arrays(self.manifest), hashes.T, strict=True))
        self.labels: np.ndarray = self._checked_whole("labels")
        self.sizes: np.ndarray = self._checked_whole("sizes")
        self.skipped: np.ndarray = self._checked_whole("skipped")
        self.file_hashes: np.ndarray = self._checked_whole("file_hashes")  # 0: not recorded
        self._keys: list[str] | None = None
        self._cache_bytes = cache_bytes
        self._caches: dict[str | None, BlockCache] = {}

    @classmethod
    def for_data(
        cls,
        path: Path | str | Location,
        dataset: Any,
        *,
        models: Sequence[str] | None = None,
        checkpoints: Mapping[str, str] | None = None,
    ) -> StoreReader:
        """The store made from ``dataset`` (a ``fastkd.data.ImageDataset``: its fingerprint,
        classes, keys in order, and labels), refusing one made for other data, classes or models:
        ``models`` must be in it, each with the checkpoint sha256 in ``checkpoints``. Classes
        named by index (file lists, shards: no names) are checked by count alone, so a store
        whose manifest names them "0".."C-1" (dumped before names were left out) still opens."""
        reader = cls(
            path,
            Expectation(
                fingerprint=dataset.fingerprint(),
                num_classes=dataset.num_classes,
                classes=list(dataset.classes) or None,
                models=list(models) if models else None,
                checkpoints=dict(checkpoints) if checkpoints else None,
            ),
        )
        if reader.keys != list(dataset.keys):
            raise StoreMismatchError(
                reader.path,
                ["keys: the store's samples are not the data set's, in the same order"],
                f"it was made from other data than {dataset.source}",
            )
        relabelled = np.flatnonzero(reader.labels != dataset.labels)
        if relabelled.size:  # a file list's or a shard's label is not in the fingerprint
            first = int(relabelled[0])
            raise StoreMismatchError(
                reader.path,
                [
                    f"labels: {relabelled.size} sample(s) have another label than at the dump, "
                    f"first {dataset.keys[first]!r}: store has {int(reader.labels[first])}, "
                    f"{dataset.source} has {int(dataset.labels[first])}"
                ],
                "its targets were made with the old labels; dump again with --overwrite",
            )
        return reader

    def _checked_whole(self, name: str) -> np.ndarray:
        """A per-sample array read whole, each written block checked against its hash. One read
        when all is well; else block by block, to name the damaged one (``integrity.damaged``)."""
        array, hashes = self._group[name], self._hashes[name]
        blocks = [
            (b, self.layout.block_samples(b, self.num_samples))
            for b in np.flatnonzero(self._done).tolist()
        ]
        try:
            values = array[:]
        except Exception:  # a shard that cannot be decoded: find it below
            values = None
        if values is not None and all(
            digest(values[start:stop]) == hashes[b] for b, (start, stop) in blocks
        ):
            return values
        for b, rows in blocks:
            _, bad = read_block(self.location, array, name, b, rows, int(hashes[b]))
            if bad is not None:
                raise damaged(bad, self.path)
        return array[:]  # every block checks now: what changed was not on disk

    # -- manifest shortcuts --------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_views(self) -> int:
        return self.manifest.views

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models]

    @property
    def keys(self) -> list[str]:
        """Sample keys (paths relative to the data root), loaded on first use."""
        if self._keys is None:
            self._keys = [str(k) for k in self._checked_whole("keys")]
        return self._keys

    def pending_blocks(self) -> list[int]:
        return np.flatnonzero(~self._done).tolist()

    @property
    def blocks_decoded(self) -> int:
        """Shards decoded so far by the block caches (each decoded once while it stays cached)."""
        return sum(cache.loads for cache in self._caches.values())

    # -- random access -------------------------------------------------------------------------

    def _cache(self, model: str | None) -> BlockCache:
        """The block cache of one model's arrays (None: the view parameters), made on first use;
        zarr lookups cost milliseconds, so they happen only here."""
        cache = self._caches.get(model)
        if cache is None:
            limits = {}
            if model is None:
                paths = {name: name for name in ("boxes", "flips")}
            else:
                entry = self.manifest.model(model)
                names = model_arrays(entry, self.num_views)
                paths = {name: f"models/{model}/{name}" for name in names}
                for ids in CLASS_ID_ARRAYS:
                    if ids in names:
                        limits[ids] = entry.num_classes
            arrays = {name: self._group[path] for name, path in paths.items()}
            hashes = {name: (path, self._hashes[path]) for name, path in paths.items()}
            share = self._cache_bytes // (len(self.manifest.models) + 1)
            where = f"store {self.path}, model {model!r}"
            cache = BlockCache(
                arrays,
                self.layout.samples_per_shard,
                share,
                hashes,
                self.location,
                limits,
                where,
                concurrency=self.location.options.concurrency if self.location.is_remote else 1,
            )
            self._caches[model] = cache
        return cache

    def _rows(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        if views.size == 1 and samples.size != 1:
            views = np.broadcast_to(views, samples.shape)
        if samples.shape != views.shape:
            raise ConfigError(
                f"samples {samples.shape} and views {views.shape} must have one entry per row"
            )
        if samples.size and not (samples.min() >= 0 and samples.max() < self.num_samples):
            bad = samples[(samples < 0) | (samples >= self.num_samples)][0]
            raise IndexError(f"sample {bad} is outside the store's {self.num_samples} samples")
        if views.size and not (views.min() >= 0 and views.max() < self.num_views):
            bad = views[(views < 0) | (views >= self.num_views)][0]
            raise IndexError(f"view {bad} is outside the store's {self.num_views} views")
        blocks = samples // self.layout.samples_per_shard
        if not self._done[blocks].all():
            s = samples[~self._done[blocks]][0]
            raise StoreError(
                f"sample {s} of {self.path} is in block {s // self.layout.samples_per_shard}, not written yet"
            )
        return samples, views

    def view_params(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes [b, 4] (y0, x0, h, w fractions, as ``views.view_params``) and flips [b] of
        the given rows, from the stored pixel boxes."""
        samples, views = self._rows(samples, views)
        rows = self._cache(None).gather(samples, views)
        return box_fractions(rows["boxes"], self.sizes[samples]), rows["flips"]

    def read(self, model: str, samples: np.ndarray, views: np.ndarray) -> ModelTargets:
        """Stored targets of one model for rows (samples[i], views[i])."""
        cache = self._cache(model)
        return ModelTargets(**cache.gather(*self._rows(samples, views)))

    def read_pool(
        self, models: Sequence[str] | None, samples: np.ndarray, views: np.ndarray
    ) -> PoolArrays:
        """Targets of several models (default: all, in manifest order) stacked along axis 1, as
        stored (``PoolArrays``). All models must be stored alike (top-k, tail, draws)."""
        names = list(models) if models is not None else self.model_names
        entries = [self.manifest.model(n) for n in names]
        modes = {(e.topk, e.tail, e.tail_samples) for e in entries}
        if len(modes) != 1:
            raise ConfigError(
                f"store {self.path}: read_pool needs one storage mode for all models, got "
                + ", ".join(
                    f"{e.name}: topk {e.topk}, tail {e.tail}, tail_samples {e.tail_samples}"
                    for e in entries
                )
            )
        members = [self.read(n, samples, views) for n in names]
        stacked = {
            name: np.stack([getattr(m, name) for m in members], axis=1)
            for name in model_arrays(entries[0], self.num_views)
        }
        return PoolArrays(**stacked, tail=entries[0].tail)
