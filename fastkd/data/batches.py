"""What both view loaders share: the per-config preprocessing, the item list, the batch plan.

A loader works through a flat list of (sample, view) items with their crop boxes and flips
(``fastkd.views.view_params``), cut into planned batches, and yields ``ViewBatch``es holding one
image tensor per timm data config. Both backends (``fastkd.data.loader`` for torch,
``fastkd.data.dali`` for DALI) crop the same integer pixel box (``Items.pixel_boxes``), resize it
per ``Preprocess``, take each file's bytes through the same checks before decoding them
(``Items.checked_bytes``: a cut or damaged file must never reach DALI, see
``fastkd.data.wholeness``) and report unreadable files the same way (``resolve_failures``); a
``LoadPlan`` is what the loader hands either one. This module is that common ground, so neither
backend imports the other.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastkd.choices import OnBadImage
from fastkd.data.datasets import ImageDataset
from fastkd.data.wholeness import incomplete
from fastkd.errors import BadImageError, ConfigError
from fastkd.views import pixel_box

log = logging.getLogger(__name__)

PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling


@dataclass(frozen=True)
class Preprocess:
    """The part of a timm data config that turns a view's crop into a model input."""

    height: int
    width: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocess:
        channels, height, width = (int(v) for v in config["input_size"])
        interpolation = str(config.get("interpolation", "bilinear"))
        if channels != 3:
            raise ConfigError(f"data config input_size {config['input_size']}: need 3 channels")
        if interpolation not in PIL_RESAMPLE:
            raise ConfigError(
                f"data config interpolation {interpolation!r} is not supported for stored views; "
                f"use one of {sorted(PIL_RESAMPLE)}"
            )
        return cls(
            height=height,
            width=width,
            interpolation=interpolation,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )


@dataclass
class ViewBatch:
    """One batch of (sample, view) items and each data config's images of them."""

    samples: torch.Tensor  # int64 [b]
    views: torch.Tensor  # int64 [b]
    labels: torch.Tensor  # int64 [b]
    images: list[torch.Tensor]  # one float32 [b, 3, H, W] per data config, on the device
    file_hashes: np.ndarray  # int64 [b]: content hash of each file as it was read
    skipped: dict[int, str] = field(default_factory=dict)  # sample -> why, dropped from the batch


@dataclass
class Items:
    """The flat item list a loader works through."""

    dataset: ImageDataset
    samples: np.ndarray  # int64 [n]
    views: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, 4] fractional (y0, x0, h, w)
    flips: np.ndarray  # bool [n]

    def name(self, position: int) -> str:
        """The item's image in messages: its file, or ``shard.tar:member``."""
        return self.dataset.name(int(self.samples[position]))

    def read(self, position: int) -> bytes:
        """The item's encoded image, wherever it lies (file or shard member)."""
        return self.dataset.read_bytes(int(self.samples[position]))

    def checked_bytes(self, position: int) -> tuple[bytes, None] | tuple[None, str]:
        """``(data, None)``: the item's encoded image, fit to be decoded; or ``(None, why)``: its
        header is unreadable or refused (``ImageDataset.read_sizes``), the file cannot be read,
        or the bytes are not a whole image (``fastkd.data.wholeness``). Both backends ask this
        before decoding, so they refuse the same files for the same reasons."""
        refused = self._unreadable.get(int(self.samples[position]))
        if refused is not None:
            return None, refused
        try:
            data = self.read(position)
        except OSError as error:
            return None, f"{type(error).__name__}: {error}"
        why = incomplete(data)
        return (None, why) if why is not None else (data, None)

    @functools.cached_property
    def _unreadable(self) -> dict[int, str]:
        return self.dataset.read_sizes()[1]

    def pixel_boxes(self, positions: np.ndarray) -> np.ndarray:
        """int64 [b, 4] = (top, left, h, w): the integer crop both backends cut."""
        sizes, _ = self.dataset.read_sizes()
        return np.array(
            [pixel_box(self.boxes[p], *sizes[self.samples[p]]) for p in positions],
            dtype=np.int64,
        ).reshape(len(positions), 4)

    def batch(
        self,
        positions: np.ndarray,
        images: list[torch.Tensor],
        skipped: dict,
        file_hashes: np.ndarray,
    ) -> ViewBatch:
        samples = self.samples[positions]
        return ViewBatch(
            samples=torch.from_numpy(samples),
            views=torch.from_numpy(self.views[positions]),
            labels=torch.from_numpy(self.dataset.labels[samples]),
            images=images,
            skipped=skipped,
            file_hashes=np.asarray(file_hashes, dtype=np.int64).reshape(len(positions)),
        )


@dataclass
class LoadPlan:
    """What a backend is asked to load: the items in their planned batches, the preprocessing
    per data config, the device the images land on and what to do with an unreadable image."""

    items: Items
    preps: list[Preprocess]
    batches: list[np.ndarray]  # item positions of each batch (``plan_batches``)
    device: torch.device
    on_bad_image: OnBadImage


def plan_batches(num_items: int, batch_size: int, breaks: Sequence[int] = ()) -> list[np.ndarray]:
    """Item positions of each batch: runs of ``batch_size`` that never straddle a break.

    With the breaks at block boundaries, a block's items always form the same batches, whatever
    else the run covers: a resumed dump feeds the models the very batches of an uninterrupted one.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    edges = sorted({0, num_items, *(b for b in breaks if 0 < b < num_items)})
    return [
        np.arange(start, min(start + batch_size, stop))
        for lo, stop in itertools.pairwise(edges)
        for start in range(lo, stop, batch_size)
    ]


def resolve_failures(
    items: Items, failed: Mapping[int, str], on_bad_image: OnBadImage
) -> dict[int, str]:
    """Item failures -> {sample: why}; raise ``BadImageError`` for the first unless skipping."""
    skipped: dict[int, str] = {}
    for position, reason in sorted(failed.items()):
        sample = int(items.samples[position])
        if on_bad_image == "fail":
            raise BadImageError(items.name(position), sample, reason)
        if sample not in skipped:
            log.warning("skipping unreadable image %s: %s", items.name(position), reason)
        skipped[sample] = reason
    return skipped
