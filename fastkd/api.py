"""The pieces of ``fastkd train`` for a training loop of one's own (``import fastkd``).

A store holds every pool member's targets for each (sample, view) row and the view's crop box and
flip. A loop of one's own needs four things from it, each the one ``fastkd train`` uses, so the
same seed and settings give the same steps (``examples/own_loop.py``; a test holds it to
``fastkd train``'s loss curve):

- ``open_store``: the store, checked against the data it is used with;
- ``epoch_rows``: an epoch's (sample, view) rows in ``fastkd train``'s order;
- ``read_targets`` and ``target_columns``: the rows' stored targets as the kernels' ``PoolTargets``,
  in the columns a student is taught from;
- ``ViewTransform``: a row's view rebuilt from the image file, as the torch loader rebuilds it.

The loss itself is ``fastkd.partitioned_kd_loss`` (or the module ``fastkd.PartitionedKDLoss``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastkd.augment import AugmentConfig
from fastkd.data import ImageDataset, Preprocess, load_view, open_dataset
from fastkd.data.batches import check_encoded, normalize
from fastkd.errors import ConfigError, DatasetError
from fastkd.kernels import PoolTargets
from fastkd.runtime import DistContext
from fastkd.storage import as_location
from fastkd.store import StoreReader
from fastkd.targets import pool_targets
from fastkd.training import EpochPlanner
from fastkd.views import pixel_box


def open_store(
    path: str | os.PathLike,
    data: str | os.PathLike | ImageDataset | None = None,
    *,
    storage_options: Mapping[str, Any] | Sequence[str] | None = None,
) -> StoreReader:
    """The finished store at ``path`` (a folder, or an ``s3://`` URL: ``storage_options`` as
    ``--storage-option``'s, beside the AWS environment variables). With ``data`` (an image
    folder, a file list or tar shards, or the ``open_dataset`` of one), refuse a store made from
    other images, keys or labels, as ``fastkd train`` does."""
    location = as_location(path, storage_options)
    if data is None:
        return StoreReader(location)
    dataset = data if isinstance(data, ImageDataset) else open_dataset(data)
    return StoreReader.for_data(location, dataset)


def epoch_rows(store: StoreReader, epoch: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (sample, view) rows of ``epoch`` (from 0) in ``fastkd train --seed SEED``'s order on
    one process: samples int64 [n], a permutation less the images the dump skipped, and each
    one's view, every stored view once per ``store.num_views`` epochs. Cut them into batches of
    ``--batch-size`` in order (the last may be smaller) to take ``fastkd train``'s steps."""
    planner = EpochPlanner(
        seed=seed,
        batch_size=max(1, store.num_samples),
        dist=DistContext(),
        sizes=store.sizes,
        num_views=store.num_views,
        augment=AugmentConfig(),
        reader=store,
    )
    plan = planner.plan(epoch)
    return plan.samples, plan.views


def read_targets(
    store: StoreReader,
    samples: Sequence[int] | np.ndarray | torch.Tensor,
    views: Sequence[int] | np.ndarray | torch.Tensor,
    members: Sequence[str] | None = None,
) -> PoolTargets:
    """The stored targets of rows (samples[i], views[i]) of the ``members`` (default: all, in
    the store's order) as host tensors, one column per member; ``.to(device)`` them."""
    samples, views = (np.asarray(rows, dtype=np.int64) for rows in (samples, views))
    return pool_targets(store.read_pool(members, samples, views))


class ViewTransform:
    """Rebuilds a stored view from its image file: decode (``fastkd.data.decode_rgb``'s rule),
    crop the view's box, resize to the data config's input size with its interpolation, flip,
    normalise with its mean and std: float32 [3, H, W], bit for bit what ``fastkd train``'s torch
    loader feeds the model; a file the loaders refuse as cut or damaged (``fastkd.data.wholeness``)
    is refused with ``DatasetError``. For a torch ``Dataset``'s ``__getitem__``::

        transform = ViewTransform(model_data_config)
        boxes, flips = store.view_params(samples, views)       # once per epoch
        image = transform(path, boxes[i], flips[i])              # in the workers
    """

    def __init__(self, data_config: Mapping[str, Any]) -> None:
        self.prep = Preprocess.from_data_config(data_config)

    def __call__(
        self, image: str | os.PathLike | bytes, box: Sequence[float], flip: bool
    ) -> torch.Tensor:
        """``image``: the file's path or its bytes; ``box``: the view's fractional (y0, x0, h,
        w) and ``flip`` its mirror, as ``StoreReader.view_params`` gives them."""
        if isinstance(image, bytes | bytearray | memoryview):
            data, name = bytes(image), Path("<bytes>")
        elif isinstance(image, str | os.PathLike):
            name = Path(image)
            data = name.read_bytes()
        else:
            raise ConfigError(
                f"ViewTransform takes an image file's path or bytes, got {type(image).__name__}: "
                "the decoding rule reads the file (16-bit and CMYK images included)"
            )
        checked = check_encoded(name, data)  # a cut or damaged file, which the loaders refuse
        if checked.data is None:
            raise DatasetError(f"cannot read image {name}: {checked.why}. Fix or remove it")
        with Image.open(io.BytesIO(data)) as opened:  # the header's size, as the store's boxes
            width, height = opened.size
        box = pixel_box(np.asarray(box, dtype=np.float64), height, width)
        (plane,) = load_view(name, box, bool(flip), [self.prep], data)
        return normalize(torch.tensor(plane)[None], self.prep)[0]  # PIL's array is read-only

    def __repr__(self) -> str:
        prep = self.prep
        return f"ViewTransform({prep.height}x{prep.width}, {prep.interpolation})"
