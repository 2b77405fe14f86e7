"""Running models over a data set to get the predictions the transfer metrics are made of.

The eval view is view 0 of ``fastkd.views`` (centre square of ``crop_pct`` x the short side, no
flip), resized and normalised with each model's own timm data config: timm's eval transform.
``fastkd.metrics`` turns the predictions into figures; training calls ``evaluate`` for model
selection on held-out data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fastkd.augment import AugmentConfig
from fastkd.data import ImageDataset, open_dataset, view_loader
from fastkd.errors import ConfigError
from fastkd.input_size import (
    DATA_CONFIG_SOURCE,
    OVERRIDE_SOURCE,
    announce_input,
    with_input_size,
)
from fastkd.metrics import TransferReport, transfer_report
from fastkd.models import ModelSpec, load_model
from fastkd.runtime import autocast
from fastkd.views import view_params


@torch.no_grad()
def evaluate(
    models: Mapping[str, torch.nn.Module],
    data_configs: Mapping[str, dict],
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    amp: bool = True,
    samples: np.ndarray | None = None,
    input_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Top-1 predictions of each model on the eval view of ``samples`` of ``dataset`` (default:
    every sample), in the order of ``samples``: [len(samples)] each.

    The eval view is view 0 of ``fastkd.views`` (centre square of ``crop_pct`` x the short side,
    no flip), resized and normalised with each model's own timm data config: timm's eval
    transform. Models sharing a ``crop_pct`` share one decoding pass. Models are left in eval mode.
    ``samples`` (distinct indices into ``dataset``) lets DDP ranks each take a disjoint slice.
    ``input_size`` overrides every data config's image size (``with_input_size``).
    """
    configs = {name: dict(data_configs[name]) for name in models}
    source = DATA_CONFIG_SOURCE
    if input_size is not None:
        configs = {name: with_input_size(c, input_size) for name, c in configs.items()}
        source = OVERRIDE_SOURCE
    for name, config in configs.items():
        announce_input(name, config, source, dataset)
    return eval_view_outputs(
        models, configs, dataset, lambda logits: logits.argmax(dim=1),
        batch_size=batch_size, device=device, backend=backend, amp=amp, samples=samples,
    )  # fmt: skip


@torch.no_grad()
def eval_view_outputs(
    models: Mapping[str, torch.nn.Module],
    data_configs: Mapping[str, dict],
    dataset: ImageDataset,
    keep: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    amp: bool = True,
    samples: np.ndarray | None = None,
    num_workers: int | None = None,
) -> dict[str, np.ndarray]:
    """``keep(logits)`` of each model on the eval view of ``samples`` (``evaluate``'s pass:
    ``keep`` = argmax gives its predictions, identity the logits), in the order of ``samples``."""
    device = torch.device(device)
    samples = _eval_samples(dataset, samples)
    by_crop: dict[float, list[str]] = {}
    for name in models:
        crop_pct = float(data_configs[name].get("crop_pct") or AugmentConfig.eval_crop_pct)
        by_crop.setdefault(crop_pct, []).append(name)
    predictions: dict[str, np.ndarray] = {}
    for crop_pct, names in by_crop.items():
        boxes, flips = view_params(
            0, samples, 1, dataset.sizes[samples], AugmentConfig(eval_crop_pct=crop_pct)
        )
        out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        rows = []
        for name in names:
            models[name].eval()
        batches = view_loader(
            dataset,
            samples,
            np.zeros_like(samples),
            boxes[:, 0],
            flips[:, 0],
            [data_configs[name] for name in names],
            batch_size=batch_size,
            backend=backend,
            device=device,
            num_workers=num_workers,
        )
        # The loader keeps the items' order and fails on an unreadable image: the batches'
        # predictions, concatenated, are those of ``samples``; one copy to the host per model.
        for batch in batches:
            rows.append(batch.samples.numpy())
            for name, images in zip(names, batch.images, strict=True):
                with autocast(device, amp):
                    out[name].append(keep(models[name](images)))
        if rows and not np.array_equal(np.concatenate(rows), samples):
            raise RuntimeError("the view loader returned other samples than asked to evaluate")
        for name, parts in out.items():
            found = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.int64)
            predictions[name] = found
    return predictions


def _eval_samples(dataset: ImageDataset, samples: np.ndarray | None) -> np.ndarray:
    """``samples`` as int64 indices of ``dataset``, checked distinct and in range (all: None)."""
    if samples is None:
        return np.arange(len(dataset), dtype=np.int64)
    samples = np.asarray(samples, dtype=np.int64).reshape(-1)
    if samples.size and (samples.min() < 0 or samples.max() >= len(dataset)):
        raise ConfigError(f"samples must index the {len(dataset)} samples of {dataset.source}")
    if np.unique(samples).size != samples.size:
        raise ConfigError("samples to evaluate must be distinct")
    return samples


def predict_checkpoints(
    dataset: ImageDataset,
    specs: Sequence[ModelSpec],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    input_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``evaluate`` of models given as specs (``NAME=CKPT``), loaded one at a time;
    ``input_size`` overrides each one's data config image size."""
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"model name(s) {twice} given twice; name them apart (alias:ARCH=CKPT)")
    predictions = {}
    for spec in specs:
        loaded = load_model(spec, input_size=input_size)
        if loaded.num_classes != dataset.num_classes:
            raise ConfigError(
                f"model {spec.name!r} ({spec.checkpoint or spec.arch}) has {loaded.num_classes} "
                f"classes, the data set {dataset.source} has {dataset.num_classes}"
            )
        announce_input(spec.name, loaded.data_config, loaded.input_source, dataset)
        predictions.update(
            evaluate(
                {spec.name: loaded.model.to(device)},
                {spec.name: loaded.data_config},
                dataset,
                batch_size=batch_size,
                device=device,
                backend=backend,
            )
        )
        del loaded
    return predictions


def transfer_from_checkpoints(
    data: str | os.PathLike,
    before: Sequence[ModelSpec],
    after: Sequence[ModelSpec],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    input_size: int | None = None,
) -> TransferReport:
    """The transfer report of trained checkpoints (``after``) against the pool before training
    (``before``: every member, matched to ``after`` by name), evaluated on ``data``, every model
    at ``input_size`` when given (else its own data config's)."""
    dataset = open_dataset(data)
    kwargs = {
        "batch_size": batch_size, "device": device, "backend": backend, "input_size": input_size,
    }  # fmt: skip
    return transfer_report(
        dataset.labels,
        predict_checkpoints(dataset, before, **kwargs),
        predict_checkpoints(dataset, after, **kwargs),
    )
