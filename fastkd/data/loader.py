"""The view loader: stored views replayed as batches, preprocessed for every model of a pool.

``view_loader`` turns a list of (sample, view) items with their crop boxes and flips
(``fastkd.views.view_params``) into batches holding one image tensor per timm data config. Every
backend does the same thing in the same order: decode, crop the view's integer pixel box
(``views.pixel_box``), resize the crop to the config's input size with its interpolation, flip,
normalise. All decode every image mode by one rule (``fastkd.data.decoding``: DALI's, measured;
e.g. 16-bit samples become ``round(v / 257)``, alpha is dropped, modes without a shared rule are
refused by all), so they see the same pixels. The crop is the same integer box in all; the
resize kernels differ slightly (DALI's resampling vs PIL's), so the backends agree to within
a few grey levels, not bit for bit.

- ``backend="dali"``: an NVIDIA DALI pipeline (``fastkd.data.dali``).
- ``backend="nvjpeg"``: JPEGs decoded on the device by torchvision (nvJPEG on a GPU), resized
  there as PIL resizes; other images by PIL in ``DataLoader`` workers (``fastkd.data.nvjpeg``).
- ``backend="torch"``: a torch ``DataLoader`` whose workers load whole batches with PIL (here).

All check each file's bytes before decoding them (``Items.checked_bytes``, whose structure
check is ``fastkd.data.wholeness``): DALI crashes the process on some cut files and decodes
others silently, so a cut or damaged file never reaches it, and every backend refuses (or skips)
the same files with the same reason.

This module checks the arguments, picks the backend and holds the torch one; what they share
(items, preprocessing, batch plan, the workers' ``DataLoader``) is in ``fastkd.data.batches``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

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
    stack_views,
    worker_loader,
)
from fastkd.data.dali import dali_batches
from fastkd.data.datasets import ImageDataset
from fastkd.data.nvjpeg import nvjpeg_batches, nvjpeg_unavailable
from fastkd.errors import ConfigError
from fastkd.hashing import content_hash


def resolve_backend(
    backend: Backend, device: torch.device | str | None = None
) -> Literal["dali", "torch", "nvjpeg"]:
    """``auto``: DALI when it can be imported, else nvjpeg when ``device`` is a GPU that
    torchvision decodes JPEGs on, else torch. An explicit backend that cannot run here is a
    ``ConfigError`` saying why."""
    choices = get_args(Backend)
    if backend not in choices:
        raise ConfigError(
            f"backend must be one of {', '.join(map(repr, choices))}, got {backend!r}"
        )
    if backend == "torch":
        return "torch"
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "nvjpeg":
        why = nvjpeg_unavailable(device)
        if why is not None:
            raise ConfigError(f"backend 'nvjpeg' needs {why}; use the torch backend")
        return "nvjpeg"
    has_dali = _has_dali()
    if backend == "dali" and not has_dali:
        raise ConfigError(
            "backend 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); use torch"
        )
    if has_dali:
        return "dali"
    return "nvjpeg" if device.type == "cuda" and nvjpeg_unavailable(device) is None else "torch"


def _has_dali() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


MAX_WORKERS = 32  # beyond this, more DataLoader processes only add start-up time and memory


def default_workers(device: torch.device) -> int:
    """Loader workers (DALI threads or DataLoader processes) when none are given, sized to the
    cores this process may use, shared with the other ranks of its node under torchrun
    (LOCAL_WORLD_SIZE). On a GPU all of them but one: decoding scales with workers, and the
    main process only drives the GPU. On a CPU device the forward needs the same cores: at most
    8, as before."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        return max(1, min(MAX_WORKERS, share - 1))
    return min(8, share)


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
    workers = num_workers if num_workers is not None else default_workers(plan.device)
    chosen = resolve_backend(backend, plan.device)
    if chosen == "dali":
        return dali_batches(plan, batch_size, workers)
    if chosen == "nvjpeg":
        return nvjpeg_batches(plan, workers)
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
        checked = items.checked_batch(positions)  # read once, together: checked, decoded, hashed
        boxes = items.pixel_boxes(positions)
        for position, box, (data, why, _) in zip(positions, boxes, checked, strict=True):
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
        images = stack_views(planes, self.preps)
        return np.asarray(kept, dtype=np.int64), images, failed, np.asarray(hashes, np.int64)


def _torch_batches(plan: LoadPlan, num_workers: int) -> Iterator[ViewBatch]:
    items, preps, device = plan.items, plan.preps, plan.device
    loader = worker_loader(_BatchSource(items, preps, plan.batches), num_workers, device)
    for kept, images, failed, hashes in loader:
        skipped = resolve_failures(items, failed, plan.on_bad_image)
        images = [
            normalize(batch.to(device, non_blocking=True), prep)
            for batch, prep in zip(images, preps, strict=True)
        ]
        yield items.batch(kept, images, skipped, hashes)
