"""The reader's cache of decoded blocks: random rows at numpy's speed, each block checked once.

A zarr lookup costs milliseconds, so the reader (``reader``) never looks rows up one by one: it
decodes a whole shard (one block of an array) into a slot of a fixed arena and gathers rows from
the resident blocks with numpy; a shuffled epoch decodes every shard about once. A block is
checked as it is decoded: against the content hash its writer recorded (``integrity``), and its
class ids against their bound (one max over the block, in the reading thread).

On object storage a block read is a few requests of a millisecond or more each, so the blocks a
batch misses are read by ``concurrency`` threads at once (every array of every missing block is
one job), and a shuffled epoch is not bound by the server's latency; locally they are read in
turn, as one core decodes them about as fast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import zarr

from fastkd.errors import StoreError
from fastkd.storage import Location
from fastkd.store.integrity import damaged, out_of_range, read_block


class BlockCache:
    """Decoded blocks of a few arrays in a fixed arena of slots, evicted least recently used.

    ``gather`` is vectorised: rows map to (slot, offset in block, view) by array lookups, so a
    batch costs a handful of numpy calls once its blocks are resident, whatever its size.
    """

    def __init__(
        self,
        arrays: Mapping[str, zarr.Array],
        samples_per_block: int,
        max_bytes: int,
        hashes: Mapping[str, tuple[str, np.ndarray]],
        store: Path | Location,
        limits: Mapping[str, int] | None = None,
        where: str = "",
        concurrency: int = 1,
    ) -> None:
        self._arrays = dict(arrays)
        self._hashes = dict(hashes)  # array -> (its path in the store, its hash per block)
        self._store = store
        self._limits = dict(limits or {})  # array -> exclusive upper bound of its values
        self._where = where
        self._block = samples_per_block
        first = next(iter(self._arrays.values()))
        self._num_samples = first.shape[0]
        num_blocks = -(-self._num_samples // samples_per_block)
        block_bytes = sum(
            samples_per_block * math.prod(a.shape[1:]) * a.dtype.itemsize
            for a in self._arrays.values()
        )
        self.slots = max(1, min(num_blocks, max_bytes // max(1, block_bytes)))
        self._arena = {
            name: np.empty((self.slots, samples_per_block, *a.shape[1:]), dtype=a.dtype)
            for name, a in self._arrays.items()
        }
        self._slot_of = np.full(num_blocks, -1, dtype=np.int64)
        self._block_in = np.full(self.slots, -1, dtype=np.int64)
        self._last_used = np.zeros(self.slots, dtype=np.int64)
        self._clock = 0
        self.loads = 0
        self._concurrency = max(1, concurrency)
        self._pool: ThreadPoolExecutor | None = None  # made on the first concurrent load

    def _load(self, blocks: np.ndarray, keep: np.ndarray) -> None:
        """Decode ``blocks`` into the least recently used slots, never evicting ``keep``'s."""
        used = self._last_used.copy()
        used[self._slot_of[keep][self._slot_of[keep] >= 0]] = np.iinfo(np.int64).max
        victims = np.argsort(used, kind="stable")[: blocks.size]
        placed = list(zip(blocks.tolist(), victims.tolist(), strict=True))
        for _, slot in placed:  # the slots are emptied first: a failed load leaves none stale
            old = self._block_in[slot]
            if old >= 0:
                self._slot_of[old] = -1
                self._block_in[slot] = -1
        jobs = [(block, slot, name) for block, slot in placed for name in self._arrays]
        if self._concurrency > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._concurrency, "fastkd-block-read")
            futures = [self._pool.submit(self._read_into, job) for job in jobs]
            wait(futures)  # all of them: none may write into a slot after this load failed
            for future in futures:
                future.result()  # the first job's error, if any
        else:
            for job in jobs:
                self._read_into(job)
        for block, slot in placed:
            self._slot_of[block] = slot
            self._block_in[slot] = block
            self.loads += 1

    def _read_into(self, job: tuple[int, int, str]) -> None:
        """Decode one array's block into its slot, checked against its hash and bound."""
        block, slot, name = job
        start = block * self._block
        stop = min(start + self._block, self._num_samples)
        path, hashes = self._hashes[name]
        values, bad = read_block(
            self._store, self._arrays[name], path, block, (start, stop), int(hashes[block])
        )
        if bad is not None:
            raise damaged(bad, self._store)
        self._arena[name][slot, : stop - start] = values
        if name in self._limits:
            self._check_range(name, self._arena[name][slot, : stop - start], start)

    def _check_range(self, name: str, values: np.ndarray, start: int) -> None:
        """Values of a freshly decoded block must lie in [0, limit): one max (and min) pass."""
        limit = self._limits[name]
        found = out_of_range(values, limit)
        if found is None:
            return
        row, value = found
        raise StoreError(
            f"{self._where}: {name} of sample {start + row} holds {value}, outside "
            f"[0, {limit}): the store is damaged (rewrite its block with the same `fastkd dump` "
            "command and --repair)"
        )

    def gather(self, samples: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``(samples[i], views[i])`` of every array."""
        blocks = samples // self._block
        needed = np.unique(blocks)
        if needed.size > self.slots:  # more blocks than fit: split the batch by blocks
            out = {
                name: np.empty((samples.size, *a.shape[3:]), dtype=a.dtype)
                for name, a in self._arena.items()
            }
            for group in np.array_split(needed, -(-needed.size // self.slots)):
                mask = np.isin(blocks, group)
                for name, rows in self.gather(samples[mask], views[mask]).items():
                    out[name][mask] = rows
            return out
        missing = needed[self._slot_of[needed] < 0]
        if missing.size:
            self._load(missing, needed)
        self._clock += 1
        slot = self._slot_of[blocks]
        self._last_used[slot] = self._clock
        offset = samples - blocks * self._block
        return {name: a[slot, offset, views] for name, a in self._arena.items()}
