"""A training run's transfer report that cannot mislead: what produced it, on which data, and
what teaching added over a cross-entropy control trained with the same settings and seed.

A change in top-1 after training is not all teaching: fine-tuning on the training data, or batch
norm statistics re-estimated in train mode, move it too. The control (``--control``: the same
run with ``--teachers none``) shows those; the report then gives each trained model's top-1
minus the control's on the same images, with a paired bootstrap interval. A report computed on
the validation data that also selected the weights is optimistic, and says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastkd.checkpoints import plain_state_dict, read_checkpoint
from fastkd.choices import Teachers
from fastkd.data import open_dataset
from fastkd.evaluation import predict_checkpoints
from fastkd.metrics import TransferReport, transfer_report
from fastkd.models import ModelSpec
from fastkd.statistics import paired_bootstrap
from fastkd.training.config import TrainConfig

REPORT_STEM = "report"  # report.json and report.png in the run's folder
CONTROL_DIR = "control"  # the control run's folder, inside the run's
MIN_WEIGHT_CHANGE = 1e-3  # relative L2 change of a model's weights under which a run warns


def control_config(cfg: TrainConfig) -> TrainConfig:
    """The cross-entropy control of ``cfg``: the same data, views, optimiser, learning rate,
    epochs and seed, no teachers, in ``<out>/control``."""
    return replace(
        cfg,
        teachers=Teachers.NONE,
        out_dir=cfg.out_dir / CONTROL_DIR,
        control=False,
        report=False,
    )


def _resolved(data: Path | str) -> Path | str:
    """A data spec to compare with another: a local path resolved, a URL as given."""
    return data if isinstance(data, str) else data.resolve()


def provenance(cfg: TrainConfig) -> dict:
    """What produced a report, as it states it: the data and its role, and the run's settings."""
    val = None if cfg.val_data is None else _resolved(cfg.val_data)
    selected = val is not None and _resolved(cfg.report_data) == val  # the same files, whatever flag
    return {
        "data": str(cfg.report_data),
        "data_selected_the_weights": selected,
        "teachers": cfg.teachers.value,
        "mode": "joint" if cfg.joint else cfg.loss.mode.value,
        "preset": cfg.preset,  # --preset's name, None without one
        "preset_not_applied": list(cfg.preset_not_applied),  # its settings this run left out
        "optimizer": cfg.optimizer,
        "lr": cfg.learning_rate,
        "model_lr": dict(cfg.model_lr),  # --lr NAME=VALUE: these models' own
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "temperature": cfg.loss.temperature,
        "kd_weight": cfg.loss.kd_weight,
        "ce_weight": cfg.loss.ce_weight,
        "store": None if cfg.store is None else str(cfg.store),
        "input_size": cfg.input_size,
    }


def pool_report(
    cfg: TrainConfig,
    before: Sequence[ModelSpec],
    after: Sequence[ModelSpec],
    out_dir: Path,
    device: torch.device,
    weight_change: Mapping[str, float],
    control: Mapping[str, Path] | None = None,
) -> TransferReport:
    """The transfer report of ``after`` against ``before`` on the report data, with its
    provenance, the run's ``weight_changes`` and, given the control run's checkpoints (name ->
    path), each trained model's top-1 minus its control's; saved in ``out_dir``."""
    dataset = open_dataset(cfg.report_data)
    kwargs = {"batch_size": cfg.batch_size, "device": device, "backend": cfg.backend}
    trained = {spec.name for spec in after}
    sized = {**kwargs, "input_size": cfg.input_size}  # the trained models at the run's size
    predictions_before = {
        **predict_checkpoints(dataset, [s for s in before if s.name not in trained], **kwargs),
        **predict_checkpoints(dataset, [s for s in before if s.name in trained], **sized),
    }
    predictions_after = predict_checkpoints(dataset, after, **sized)
    report = transfer_report(dataset.labels, predictions_before, predictions_after)
    report.context = provenance(cfg)
    report.context["weight_change"] = dict(weight_change)
    if control:
        specs = [ModelSpec(spec.arch, control[spec.name], spec.name) for spec in after]
        predictions_control = predict_checkpoints(dataset, specs, **sized)
        report.control = versus_control(dataset.labels, predictions_after, predictions_control)
        report.predictions_control = {k: v.tolist() for k, v in predictions_control.items()}
    report.save(out_dir / REPORT_STEM)
    return report


def versus_control(
    labels: np.ndarray,
    after: Mapping[str, np.ndarray],
    control: Mapping[str, np.ndarray],
) -> dict[str, dict]:
    """Per trained model: its top-1 and the control's, and the paired difference in points with
    a 95% bootstrap interval over the images and its verdict (``fastkd.statistics``)."""
    labels = np.asarray(labels)
    out = {}
    for name, predictions in after.items():
        right = np.asarray(predictions) == labels
        control_right = np.asarray(control[name]) == labels
        interval = paired_bootstrap([right.astype(float) - control_right.astype(float)])
        out[name] = {
            "top1": 100.0 * right.mean(),
            "control_top1": 100.0 * control_right.mean(),
            "difference": interval.estimate,
            "low": interval.low,
            "high": interval.high,
            "level": interval.level,
            "verdict": interval.verdict(),
        }
    return out


class WeightsBarelyMovedWarning(UserWarning):
    """A trained model's weights moved less than ``MIN_WEIGHT_CHANGE`` (relative)."""


def weight_changes(before: Sequence[ModelSpec], after: Mapping[str, Path]) -> dict[str, float]:
    """Each trained model's ``weight_change`` (``after``: name -> selected weights) from its
    ``before`` checkpoint (one without a file is left out), read once at the end of a run."""
    return {
        spec.name: weight_change(spec.checkpoint, after[spec.name])
        for spec in before
        if spec.name in after and spec.checkpoint is not None
    }


def warn_if_barely_moved(changes: Mapping[str, float]) -> None:
    """Warn for each model whose weights moved less than ``MIN_WEIGHT_CHANGE``."""
    for name, change in changes.items():
        if change < MIN_WEIGHT_CHANGE:
            warnings.warn(barely_moved(name, change), WeightsBarelyMovedWarning, 2)


def weight_change(before: Path, after: Path) -> float:
    """Relative L2 change of a model's learned weights: ||after - before|| / ||before|| over the
    floating-point tensors the two checkpoints share, batch norm's running statistics left out
    (they move without any learning; NaN when nothing is shared)."""
    old = _tensors(read_checkpoint(before))
    new = _tensors(read_checkpoint(after))
    moved = total = 0.0
    for key, tensor in new.items():
        if key in old and old[key].shape == tensor.shape:
            moved += float((tensor.double() - old[key].double()).square().sum())
            total += float(old[key].double().square().sum())
    return math.sqrt(moved / total) if total > 0 else math.nan


def _tensors(payload: Mapping) -> dict[str, torch.Tensor]:
    state = plain_state_dict(payload)  # fastkd, timm (EMA first) or plain checkpoints alike
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and ".running_" not in f".{k}"
    }


def barely_moved(name: str, change: float) -> str:
    """What a weight change under ``MIN_WEIGHT_CHANGE`` means, for a warning or a report."""
    return (
        f"{name}'s weights moved by {100 * change:.3g}% (under {100 * MIN_WEIGHT_CHANGE:g}%): the "
        "learning rate may be too small for it; a change in top-1 may then come from batch norm "
        "statistics re-estimated in train mode alone (--control shows it)"
    )


def _preset_text(context: Mapping) -> str:
    """The run line's preset, and its settings the run left out (its way of teaching)."""
    if not context.get("preset"):
        return ""
    left_out = context.get("preset_not_applied") or []
    return f", preset {context['preset']}" + (
        f" (not applied: {', '.join(left_out)})" if left_out else ""
    )


def caveats(report: TransferReport) -> list[str]:
    """What a reader must know before crediting a change in ``report`` to teaching, a line each."""
    context, lines = report.context, []
    if context:
        size = context.get("input_size") or "each model's own"
        lines.append(
            f"run: teachers {context['teachers']}, mode {context['mode']}, "
            f"{context['optimizer']} lr {context['lr']:g}, {context['epochs']} epochs, "
            f"batch {context['batch_size']}, seed {context['seed']}, input size "
            f"{size}, store {context.get('store')}{_preset_text(context)}"
        )
    if context.get("data_selected_the_weights"):
        lines.append(
            f"optimistic: {context['data']} is the --val-data that also selected the weights "
            "(the best epoch); give --test-data, a held-out set, for a fair figure"
        )
    for name, change in context.get("weight_change", {}).items():
        if change is None or math.isnan(change):
            lines.append(f"{name}'s weight change is unknown: its checkpoints share no weights")
        elif change < MIN_WEIGHT_CHANGE:
            lines.append(barely_moved(name, change))
    if not report.control and context:
        lines.append(
            "no control: the deltas include what plain fine-tuning would give; --control "
            "trains the cross-entropy control and reports the difference to it"
        )
    for name, c in report.control.items():
        lines.append(
            f"{name} vs its cross-entropy control on the same images: {c['difference']:+.2f} "
            f"points, {100 * c['level']:.0f}% interval [{c['low']:+.2f}, {c['high']:+.2f}] over "
            f"the images (one training seed): {c['verdict']} (control top-1 "
            f"{c['control_top1']:.2f})"
        )
    return lines
