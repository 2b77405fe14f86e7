"""Writing a store: create it or resume it, then write whole blocks, each followed by its marker.

The unit of writing is a block: one shard along the sample axis, all views, all models. Ranks
write disjoint blocks (their parts, ``claims``); a block's arrays are written in full, then its
marker in ``blocks_done`` (one unsharded chunk per block, so markers of different ranks never
share a file). Resume rewrites the blocks without a marker, so a block torn by a crash is simply
written again. A store is only reused when its manifest and labels equal the ones asked for, and
a directory that is not a fastkd store is never touched (``creation``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastkd.errors import ConfigError, StoreBusyError, StoreError
from fastkd.hashing import UNRECORDED
from fastkd.storage import Location, as_location, local_or_url
from fastkd.store.arrays import (
    BLOCK_HASHES,
    DONE_ARRAY,
    META_DIR,
    SHARED_ARRAYS,
    hashed_arrays,
    write_sample_rows,
)
from fastkd.store.claims import (
    HEARTBEAT_S,
    Holder,
    check_part,
    claim_file,
    claim_part,
    creation_lock,
)
from fastkd.store.creation import check_samples, create_or_check
from fastkd.store.encoding import encode_logits
from fastkd.store.integrity import digest, shard_file
from fastkd.store.manifest import STATUS_ATTR, Manifest, StoreLayout, open_group, open_manifest

STORE_MARKER = "store"  # in META_DIR: a fastkd store lives here (an object store has no folders)

if TYPE_CHECKING:
    import torch


class StoreWriter:
    """Writes blocks of a store; one per process, holding a claim on its part ``i/n``.

    Use ``create_or_resume`` and close it (or use it as a context manager) to release the claim.
    """

    def __init__(self, path: Path | str | Location, part: tuple[int, int], run_id: str) -> None:
        self.location = as_location(path)
        self.path = local_or_url(self.location)  # messages name it; a Path when local
        self.part = part
        self.run_id = run_id
        self.manifest, self.layout = open_manifest(self.location)
        self._group = open_group(self.location, mode="r+")
        self._done = self._group[DONE_ARRAY]
        self._claim = claim_file(self.location / META_DIR, run_id)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="fastkd-claim", daemon=True)
        self._lost_claim = False
        self._samples: tuple[list[str], np.ndarray, np.ndarray] | None = None  # keys, labels, sizes

    @classmethod
    def create_or_resume(
        cls,
        path: Path | str | Location,
        manifest: Manifest,
        keys: Sequence[str],
        labels: np.ndarray,
        sizes: np.ndarray,
        *,
        overwrite: bool = False,
        samples_per_shard: int | None = None,
        part: tuple[int, int] = (0, 1),
        force_claim: bool = False,
    ) -> StoreWriter:
        """Create the store, or reopen it when its manifest equals ``manifest`` (resume).

        A store with another configuration is refused (``StoreMismatchError``, naming what
        differs) unless ``overwrite``; a path holding anything that is not a fastkd store is never
        touched. Ranks may call this at once: one creates under a lock, the others wait and
        validate. The writer then claims ``part``; a live writer whose part overlaps is refused
        (``StoreBusyError``) unless ``force_claim``.
        """
        path = as_location(path)
        labels, sizes = check_samples(manifest, keys, labels, sizes)
        layout = StoreLayout.for_store(manifest.num_samples, manifest.views, samples_per_shard)
        check_part(part)
        if path.exists():
            raise StoreError(f"{path} is a file, not a store directory")
        meta = path / META_DIR
        # Contents first, the marker second: a rank that lists another's new marker also sees it.
        occupied = path.has_contents()
        ours = (meta / STORE_MARKER).exists() or (
            not path.is_remote and Path(path).joinpath(META_DIR).is_dir()  # before the marker
        )
        if occupied and not ours:
            raise StoreError(f"{path} exists and is not a fastkd store; choose another output path")
        (meta / STORE_MARKER).create(b"a fastkd store: docs/store-format.md\n")

        run_id = uuid.uuid4().hex[:12]
        me = Holder.me(run_id, tuple(part))
        with creation_lock(path, meta, me):
            layout = create_or_check(
                path,
                manifest,
                keys,
                labels,
                sizes,
                layout,
                samples_per_shard is not None,
                overwrite,
            )
            claim_part(path, meta, me, layout.num_blocks, force_claim)
        writer = cls(path, me.part, run_id)
        writer._samples = (list(keys), labels, sizes)
        writer._heartbeat.start()
        return writer

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_range(self, block: int) -> tuple[int, int]:
        """Samples ``[start, stop)`` of a block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside [0, {self.num_blocks})")
        return self.layout.block_samples(block, self.manifest.num_samples)

    def pending_blocks(self, part: tuple[int, int] | None = None) -> list[int]:
        """Blocks of ``part`` (default: this writer's) without a completion marker."""
        i, n = part or self.part
        done = self._done[:]
        return [b for b in range(i, self.num_blocks, n) if not done[b]]

    def write_block(
        self,
        block: int,
        logits: Mapping[str, np.ndarray | torch.Tensor],
        skipped: np.ndarray | Sequence[int] | None = None,
        file_hashes: np.ndarray | None = None,
    ) -> None:
        """Encode and write one block, then its content hashes, then mark it done.

        logits: every model's full logits [n, V, C] for the block's samples (``block_range``), in
        sample order. skipped: offsets within the block of samples whose image could not be read
        (their rows are written as zeros, whatever the logits, and flagged in ``skipped``).
        file_hashes: int64 [n], the content hash of each sample's file as the dump read it
        (``fastkd.hashing``; 0 where not recorded), which training compares with what it reads.
        """
        if self._lost_claim or not self._claim.exists():
            raise StoreBusyError(
                f"the claim {self._claim} of this writer was removed (forced by another dump?); "
                "stopping so two writers never write one block"
            )
        i, n = self.part
        if block % n != i:
            raise ConfigError(
                f"block {block} belongs to part {block % n}/{n}, this writer holds {i}/{n}"
            )
        start, stop = self.block_range(block)
        expected = [m.name for m in self.manifest.models]
        if sorted(logits) != sorted(expected):
            raise ConfigError(
                f"block {block}: logits for models {sorted(logits)}, the store has {sorted(expected)}"
            )
        for entry in self.manifest.models:
            shape = tuple(logits[entry.name].shape)
            want = (stop - start, self.manifest.views, entry.num_classes)
            if shape != want:
                raise ConfigError(
                    f"block {block}, model {entry.name!r}: logits of shape {shape}, expected {want}"
                )
        flags = np.zeros(stop - start, dtype=bool)
        hashes = np.zeros(stop - start, dtype=np.int64)
        if file_hashes is not None:
            hashes[:] = np.asarray(file_hashes, dtype=np.int64).reshape(stop - start)
        if skipped is not None:
            offsets = np.asarray(skipped, dtype=np.int64).reshape(-1)
            if offsets.size and (offsets.min() < 0 or offsets.max() >= stop - start):
                raise ConfigError(
                    f"block {block}: skipped offsets must be in [0, {stop - start}) (offsets "
                    f"within the block, not sample indices), got {offsets.tolist()}"
                )
            flags[offsets] = True

        if self._samples is None:
            raise StoreError("write_block needs a writer from StoreWriter.create_or_resume")
        keys, labels, sizes = self._samples
        models = self._group["models"]
        encoded_models = []
        for index, entry in enumerate(self.manifest.models):
            try:
                encoded = encode_logits(
                    logits[entry.name],
                    labels[start:stop],
                    entry,
                    seed=self.manifest.seed,
                    first_sample=start,
                    model_index=index,
                )
            except ValueError as err:
                raise ConfigError(
                    f"block {block} (samples {start}-{stop - 1}), model {entry.name!r}: {err}"
                ) from None
            member = models[entry.name]
            for name, values in encoded.items():
                values[flags] = 0  # a skipped sample's rows hold no targets (zeros, as unwritten)
                encoded_models.append(np.asarray(values, dtype=member[name].dtype))
                member[name][start:stop] = values
        hashes[flags] = UNRECORDED
        # The block's rows of every shared array, written (again) from the caller's values and
        # hashed from them: a damaged shard on disk is repaired here, never recorded as right.
        written = write_sample_rows(self._group, self.manifest, start, stop, keys, labels, sizes)
        written |= {"skipped": flags, "file_hashes": hashes}
        for name in ("skipped", "file_hashes"):
            self._group[name][start:stop] = written[name]
        shared = [written[name] for name in SHARED_ARRAYS]
        self._group[BLOCK_HASHES][block] = [digest(v) for v in shared + encoded_models]
        self._done[block] = 1

    def file_hashes(self, block: int) -> np.ndarray:
        """The content hash recorded for each file of a written block (0: not recorded)."""
        return self._group["file_hashes"][slice(*self.block_range(block))]

    def rewrite(self, blocks: Sequence[int]) -> None:
        """Drop the done markers of ``blocks`` (damaged ones, ``integrity.check_store``), then
        their shard files, so this writer's pending blocks include them and ``write_block``
        writes every row of them again into fresh files (zarr would read a damaged shard back
        to merge the new rows into it)."""
        for block in blocks:
            self._done[block] = 0
        for block in blocks:
            for name in hashed_arrays(self.manifest):
                shard_file(self.location, self._group[name], block).delete()
        if blocks and STATUS_ATTR in self._group.attrs:
            del self._group.attrs[STATUS_ATTR]

    # -- claims --------------------------------------------------------------------------------

    def _beat(self) -> None:
        holder = Holder.load(self._claim)
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._claim.exists():
                    self._lost_claim = True
                    return
                if holder is not None:
                    holder.heartbeat = time.time()
                    self._claim.write_bytes(holder.to_json())
            except OSError:  # a full disk, a network out (StorageError): beat again later
                continue

    def close(self) -> None:
        """Release the claim; if every block is done, record the store as complete."""
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        self._claim.delete()
        done = self._done[:]
        if done.all() and STATUS_ATTR not in self._group.attrs:
            skipped = np.flatnonzero(self._group["skipped"][:])
            keys = self._group["keys"]
            self._group.attrs[STATUS_ATTR] = {
                "complete": True,
                "skipped": [str(keys[int(s)]) for s in skipped],
            }

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
