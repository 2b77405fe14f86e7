"""Stored targets fit the images training reads: the store is these data's, and so are the files.

A store is opened for the data set (``StoreReader.for_data``: its fingerprint, classes, keys and
labels) and the pool's weights (each given checkpoint's sha256 must be the one its stored outputs
were made with). The fingerprint sees only the images' names and sizes, so an image rewritten in
place at the same size (re-encoded, edited) would still pair old targets with new pixels: the
dump records each file's content hash (``fastkd.hashing``), the view loaders hash each image as
they read it, and each step compares the two (one numpy compare).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fastkd.data import ImageDataset
from fastkd.errors import DatasetError
from fastkd.hashing import UNRECORDED
from fastkd.models import ModelSpec, file_sha256
from fastkd.store import StoreReader
from fastkd.training.config import TrainConfig


def open_store(
    cfg: TrainConfig, dataset: ImageDataset, pool_specs: Mapping[str, ModelSpec]
) -> StoreReader:
    """Open the store, refusing one made for other data, classes or pool weights."""
    return StoreReader.for_data(
        cfg.store,
        dataset,
        models=list(cfg.members),
        # each given pool checkpoint must be the one its stored outputs were made with
        checkpoints={
            name: file_sha256(spec.checkpoint)
            for name, spec in pool_specs.items()
            if spec.checkpoint is not None
        },
    )


def check_unchanged(
    reader: StoreReader, dataset: ImageDataset, samples: np.ndarray, read: np.ndarray
) -> None:
    """The files just read must be the ones the dump read: their content hashes (``read``)
    against the store's (the data fingerprint sees only names and sizes). One compare per step."""
    stored = reader.file_hashes[samples]
    changed = (stored != UNRECORDED) & (stored != read)
    if changed.any():
        names = sorted({dataset.name(int(s)) for s in samples[changed]})
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise DatasetError(
            f"{len(names)} image(s) changed since the dump of {reader.path} (same name "
            f"and size, other content): {shown}; restore them, or rewrite the blocks made from them: "
            "the same `fastkd dump` command with --repair"
        )
