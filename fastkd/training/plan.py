"""Which (sample, view) rows each step of an epoch trains on, on this rank, and their views.

Each epoch the sample order and each sample's view come from the counter RNG
(``fastkd.views.epoch_order`` / ``epoch_views``), so a row is the same whatever the batch size or
world size. A global batch is split into contiguous, disjoint slices, one per rank; a row's image
is rebuilt from its crop box and flip: the store's, or replayed from the seed without one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fastkd.augment import AugmentConfig
from fastkd.kernels import PoolTargets
from fastkd.runtime import DistContext
from fastkd.store import StoreReader
from fastkd.views import epoch_order, epoch_views, view_params


@dataclass
class EpochPlan:
    """This rank's rows of one epoch, in step order."""

    epoch: int
    samples: np.ndarray
    views: np.ndarray
    rows_per_step: list[int]  # this rank's rows in each step
    global_rows: list[int]  # the global batch size of each step

    def step_rows(self) -> list[slice]:
        """Each step's rows of ``samples`` / ``views``."""
        bounds = np.concatenate([[0], np.cumsum(self.rows_per_step, dtype=np.int64)]).tolist()
        return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


@dataclass
class Batch:
    """One step's rows on this rank: images per data config, labels, targets when stored."""

    samples: np.ndarray
    views: np.ndarray
    labels: Tensor
    images: list[Tensor]  # one [b, 3, H, W] per image stream (data config), on the device
    global_rows: int  # rows in the step's global batch, over all ranks
    targets: PoolTargets | None = None  # the teaching strategy's targets of these rows, if any


@dataclass
class EpochPlanner:
    """Plans every epoch of a run: the seed's order less skipped samples, cut into global batches.

    ``reader``: the store whose views (boxes, flips) the rows use; None replays ``augment``'s
    views from the seed over ``num_views`` views per sample.
    """

    seed: int
    batch_size: int  # global
    dist: DistContext
    sizes: np.ndarray  # [n, 2] image sizes (height, width) of the data set
    num_views: int
    augment: AugmentConfig
    reader: StoreReader | None = None

    @property
    def num_samples(self) -> int:
        return len(self.sizes)

    def usable_order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order, less the images the dump could not read."""
        order = epoch_order(self.seed, epoch, self.num_samples)
        if self.reader is not None and self.reader.skipped.any():
            order = order[~self.reader.skipped[order]]
        return order

    def global_batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Global batches of ``batch_size``. A last batch too small to give every rank a row is
        dropped (a rank without rows cannot take part in the gradient all-reduce)."""
        size = self.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if batches and len(batches[-1]) < self.dist.world_size:
            batches.pop()
        return batches

    @property
    def steps_per_epoch(self) -> int:
        return len(self.global_batches(self.usable_order(0)))

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's rows of ``epoch``: a disjoint, contiguous slice of every global batch."""
        order = self.usable_order(epoch)
        view_of = np.empty(self.num_samples, dtype=np.int64)
        view_of[order] = epoch_views(self.seed, epoch, order, self.num_views)
        batches = self.global_batches(order)
        world, rank = self.dist.world_size, self.dist.rank
        parts = [np.array_split(batch, world)[rank] for batch in batches]
        samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return EpochPlan(
            epoch=epoch,
            samples=samples,
            views=view_of[samples],
            rows_per_step=[len(part) for part in parts],
            global_rows=[len(batch) for batch in batches],
        )

    def view_boxes(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes [n, 4] and flips [n] of the rows: the store's, or replayed from the seed."""
        if self.reader is not None:
            return self.reader.view_params(samples, views)
        boxes, flips = view_params(
            self.seed, samples, self.num_views, self.sizes[samples], self.augment
        )
        rows = np.arange(len(samples))
        return boxes[rows, views], flips[rows, views]
