"""Creating a store for a dump, or checking that the one already there is the same (resume).

A store is only reused when its manifest, layout (when one is asked for), arrays and written
labels equal the ones asked for; anything else is refused naming what differs, or, with
``overwrite``, cleared and created again, unless a live writer holds it. A directory that is not
a fastkd store is never touched, and a creation that crashed before its manifest (the
``creating`` marker) is simply made again. Runs under the creation lock (``claims``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from fastkd.errors import ConfigError, StoreBusyError, StoreError, StoreMismatchError
from fastkd.storage import Location
from fastkd.store.arrays import (
    BLOCK_HASHES,
    DONE_ARRAY,
    META_DIR,
    array_differences,
    create_store,
    hashed_arrays,
)
from fastkd.store.claims import claims
from fastkd.store.integrity import read_block
from fastkd.store.manifest import (
    Manifest,
    StoreLayout,
    json_differences,
    manifest_differences,
    open_group,
    parse_config,
    read_config,
)

_CREATING = "creating"  # marker file in META_DIR: creation started and has not finished


def create_or_check(
    path: Location,
    manifest: Manifest,
    keys: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray,
    layout: StoreLayout,
    explicit_layout: bool,
    overwrite: bool,
) -> StoreLayout:
    """Under the creation lock: create the store, or check that the existing one matches.

    Returns the layout in force (an existing store keeps its own unless one was asked for).
    """
    meta = path / META_DIR
    stored = read_config(path)
    if stored is None:
        torn = (meta / _CREATING).exists()  # a creation that crashed before its manifest
        if not torn and any(not rel.startswith(f"{META_DIR}/") for rel, _ in path.files()):
            raise StoreError(
                f"{path} holds a zarr group that is not a fastkd store; choose another output path"
            )
    else:
        try:
            stored_manifest, stored_layout = parse_config(path, stored)
        except StoreMismatchError as err:  # another format version: only overwrite helps
            problems = err.differences
        except StoreError as err:  # a manifest that fails its schema: only overwrite helps
            if not overwrite:
                raise  # one line, naming each field
            problems = [str(err)]
        else:
            problems = manifest_differences(stored_manifest, manifest)
            if explicit_layout and stored_layout != layout:
                problems += json_differences(asdict(stored_layout), asdict(layout), "layout")
            if not problems:  # the same manifest, but arrays of another shape (edited, foreign)
                group = open_group(path, mode="r")
                problems = array_differences(group, stored_manifest, stored_layout)
            if not problems:
                problems = _sample_differences(path, stored_manifest, stored_layout, labels)
            if not problems:
                return stored_layout
        if not overwrite:
            raise StoreMismatchError(
                path,
                problems,
                "refusing to resume into it; pass --overwrite (overwrite=True) to replace it, "
                "or write to another path",
            )
        live = [h for h in claims(meta) if h.is_live()]
        if live:
            raise StoreBusyError(
                f"cannot overwrite {path}: live writers hold it: "
                + "; ".join(h.describe() for h in live)
            )
    (meta / _CREATING).write_bytes(b"")
    path.delete_below(keep=lambda rel: rel.startswith(f"{META_DIR}/"))  # the lock and claims stay
    create_store(path, manifest, layout, keys, labels, sizes)
    (meta / _CREATING).delete()
    return layout


def check_samples(
    manifest: Manifest, keys: Sequence[str], labels: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The dump's samples as the manifest needs them: one key, label and image size each, the
    labels integers among its classes, the sizes not empty; labels as int64, sizes as int32."""
    n = manifest.num_samples
    labels = np.asarray(labels)
    sizes = np.asarray(sizes)
    if len(keys) != n or labels.shape != (n,) or sizes.shape != (n, 2):
        raise ConfigError(
            f"the manifest has {n} samples but got {len(keys)} keys, labels of shape "
            f"{labels.shape} and sizes of shape {sizes.shape} (need [{n}] and [{n}, 2])"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if bad.size:
        s = int(bad[0])
        raise ConfigError(
            f"sample {s} ({keys[s]}) has label {labels[s]}, outside the {manifest.num_classes} "
            f"classes of the pool ({bad.size} such samples)"
        )
    if (sizes < 1).any():
        s = int(np.flatnonzero((sizes < 1).any(axis=1))[0])
        raise ConfigError(f"sample {s} ({keys[s]}) has an empty image size {tuple(sizes[s])}")
    return labels.astype(np.int64), sizes.astype(np.int32)


def _sample_differences(
    path: Location, manifest: Manifest, layout: StoreLayout, labels: np.ndarray
) -> list[str]:
    """Labels that differ from the store's (the fingerprint already covers keys and files), in
    the written blocks whose labels are intact: a damaged block is ``--repair``'s to rewrite,
    and the others are rewritten from the caller's labels anyway."""
    group = open_group(path, mode="r")
    done = group[DONE_ARRAY][:].astype(bool)
    hashes = group[BLOCK_HASHES][:, hashed_arrays(manifest).index("labels")]
    differ, first = 0, None
    for block in np.flatnonzero(done).tolist():
        start, stop = layout.block_samples(block, manifest.num_samples)
        stored, bad = read_block(
            path, group["labels"], "labels", block, (start, stop), int(hashes[block])
        )
        if bad is not None:
            continue
        diff = np.flatnonzero(stored != labels[start:stop])
        differ += diff.size
        if diff.size and first is None:
            first = (start + int(diff[0]), stored[diff[0]])
    if not differ:
        return []
    sample, value = first
    return [
        f"labels: {differ} differ, first sample {sample}: store has {value}, expected "
        f"{labels[sample]}"
    ]
