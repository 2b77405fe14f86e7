"""The view loader: stored views replayed as batches, preprocessed for every model of a pool.

``view_loader`` turns a list of (sample, view) items with their crop boxes and flips
(``fastkd.views.view_params``) into batches holding one image tensor per timm data config. Both
backends do the same thing in the same order: decode, crop the view's integer pixel box
(``views.pixel_box``), resize the crop to the config's input size with its interpolation, flip,
normalise. Both decode every image mode by one rule (``fastkd.data.decoding``: DALI's, measured;
e.g. 16-bit samples become ``round(v / 257)``, alpha is dropped, modes without a shared rule are
refused by both), so they see the same pixels. The crop is the same integer box in both; the
resize kernels differ slightly (DALI's resampling vs PIL's), so the two backends agree to within
a few grey levels, not bit for bit.

- ``backend="dali"``: an NVIDIA DALI pipeline (``fastkd.data.dali``).
- ``backend="torch"``: a torch ``DataLoader`` whose workers load whole batches with PIL (here).

Both check each file's bytes before decoding them (``Items.checked_bytes``, whose structure
check is ``fastkd.data.wholeness``): DALI crashes the process on some cut files and decodes
others silently, so a cut or damaged file never reaches it, and both backends refuse (or skip)
the same files with the same reason.

This module checks the arguments, picks the backend and holds the torch one; what both share
(items, preprocessing, batch plan) is in ``fastkd.data.batches``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from fastkd.choices import Backend
from fastkd.data.batches import (
    Items,
    LoadPlan,
    OnBadImage,
    Preprocess,
    ViewBatch,
    load_view,
    normalize,
    plan_batches,
    resolve_failures,
)
from fastkd.data.dali import dali_batches
from fastkd.data.datasets import ImageDataset
from fastkd.errors import ConfigError
from fastkd.hashing import content_hash


def resolve_backend(backend: Backend) -> Literal["dali", "torch"]:
    """``auto``: DALI when it can be imported, else torch."""
    if backend not in ("auto", "dali", "torch"):
        raise ConfigError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    if backend == "dali" and not has_dali:
        raise ConfigError(
            "backend 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); use torch"
        )
    return "dali" if has_dali else "torch"


def view_loader(
    dataset: ImageDataset,
    samples: np.ndarray,
    views: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
    data_configs: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    breaks: Sequence[int] = (),
    backend: Backend = "auto",
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    on_bad_image: OnBadImage = "fail",
) -> Iterator[ViewBatch]:
    """Batches of the given (sample, view) items, in order, preprocessed per data config.

    samples, views: int [n]; boxes: float [n, 4] fractional (y0, x0, h, w) and flips: bool [n],
    as ``views.view_params`` gives them. Batches hold ``batch_size`` items and never straddle a
    position in ``breaks`` (``plan_batches``). A file that cannot be read or decoded raises
    ``BadImageError`` (``on_bad_image="fail"``), or with ``"skip"`` its items are dropped and the
    batch's ``skipped`` names them (a batch may then be empty). Images land on ``device``.
    """
    samples = np.asarray(samples, dtype=np.int64)
    num_items = samples.shape[0]
    views, flips = np.asarray(views, dtype=np.int64), np.asarray(flips, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float32)
    if views.shape != (num_items,) or flips.shape != (num_items,) or boxes.shape != (num_items, 4):
        raise ConfigError(
            f"need samples, views, flips [n] and boxes [n, 4] for n={num_items} items, got "
            f"views {views.shape}, flips {flips.shape}, boxes {boxes.shape}"
        )
    if num_items and (samples.min() < 0 or samples.max() >= len(dataset)):
        raise ConfigError(f"sample indices must be in [0, {len(dataset)}), got {samples.max()}")
    if on_bad_image not in ("fail", "skip"):
        raise ConfigError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if not data_configs:
        raise ConfigError("need at least one data config")
    plan = LoadPlan(
        items=Items(dataset, samples, views, boxes, flips),
        preps=[Preprocess.from_data_config(config) for config in data_configs],
        batches=plan_batches(num_items, batch_size, breaks),
        device=torch.device(device) if device is not None else torch.device("cpu"),
        on_bad_image=on_bad_image,
    )
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if resolve_backend(backend) == "dali":
        return dali_batches(plan, batch_size, max(1, workers))
    return _torch_batches(plan, workers)


# -- torch backend -----------------------------------------------------------------------------


class _BatchSource(torch.utils.data.Dataset):
    """Element ``j`` is planned batch ``j``, loaded whole in a worker (one message per batch)."""

    def __init__(self, items: Items, preps: list[Preprocess], batches: list[np.ndarray]):
        self.items, self.preps, self.batches = items, preps, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[torch.Tensor], dict, np.ndarray]:
        items, positions = self.items, self.batches[index]
        kept: list[int] = []
        hashes: list[int] = []
        planes: list[list[np.ndarray]] = [[] for _ in self.preps]
        failed: dict[int, str] = {}
        for position, box in zip(positions, items.pixel_boxes(positions), strict=True):
            data, why, _ = items.checked_bytes(position)  # read once: checked, decoded, hashed
            if data is None:
                failed[int(position)] = why
                continue
            try:
                views = load_view(
                    items.name(position), box, items.flips[position], self.preps, data
                )
            except Exception as error:  # PIL raises many types for bad files
                failed[int(position)] = f"{type(error).__name__}: {error}"
                continue
            kept.append(int(position))
            hashes.append(content_hash(data))
            for plane, image in zip(planes, views, strict=True):
                plane.append(image)
        images = [
            torch.from_numpy(np.stack(plane))
            if plane
            else torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8)
            for plane, prep in zip(planes, self.preps, strict=True)
        ]
        return np.asarray(kept, dtype=np.int64), images, failed, np.asarray(hashes, np.int64)


def _as_loaded(batch: Any) -> Any:
    """The DataLoader's collate: keep a loaded batch as it is (numpy positions stay numpy)."""
    return batch


def _torch_batches(plan: LoadPlan, num_workers: int) -> Iterator[ViewBatch]:
    items, preps, device = plan.items, plan.preps, plan.device
    loader = torch.utils.data.DataLoader(
        _BatchSource(items, preps, plan.batches),
        batch_size=None,
        collate_fn=_as_loaded,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
    )
    for kept, images, failed, hashes in loader:
        skipped = resolve_failures(items, failed, plan.on_bad_image)
        images = [
            normalize(batch.to(device, non_blocking=True), prep)
            for batch, prep in zip(images, preps, strict=True)
        ]
        yield items.batch(kept, images, skipped, hashes)
