"""What a finished run gives back (``TrainResult``): its weights, state, history and report.

After the last epoch rank 0 reads each trained model's selected weights once to measure how far
they moved (``report.weight_changes``; a model that barely moved is warned about), then reports
every pool member and student as it was before training against the trained models' selected
weights, on the report data (``eval_data``, else ``val_data``), in ``report.json`` / ``.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastkd.metrics import TransferReport
from fastkd.models import ModelSpec
from fastkd.runtime import DistContext
from fastkd.training.config import TrainConfig
from fastkd.training.learners import Learner
from fastkd.training.report import pool_report, warn_if_barely_moved, weight_changes
from fastkd.training.state import STATE_FILE
from fastkd.training.summary import EpochRecord


@dataclass
class TrainResult:
    out_dir: Path
    checkpoints: dict[str, Path]  # trained model name -> selected weights (fastkd checkpoint)
    state: Path  # resumable run state
    history: list[EpochRecord]
    report: TransferReport | None = None  # with eval_data or val_data
    control: TrainResult | None = None  # the cross-entropy control's run (``--control``)
    weight_change: dict[str, float] = field(default_factory=dict)  # ``report.weight_change``
    skipped: int = 0  # samples left out: the store flags them unreadable (``--on-bad-image skip``)


def report_specs(
    learners: list[Learner], pool_specs: Mapping[str, ModelSpec], checkpoints: Mapping[str, Path]
) -> tuple[list[ModelSpec], ...]:
    """The report's models: every pool member and student before, the trained ones after."""
    before = {learner.name: learner.before for learner in learners}
    for name, spec in pool_specs.items():
        before.setdefault(name, spec)
    after = [ModelSpec(m.arch, checkpoints[m.name], m.name) for m in learners]
    return list(before.values()), after


def run_report(
    cfg: TrainConfig,
    learners: list[Learner],
    pool_specs: Mapping[str, ModelSpec],
    checkpoints: Mapping[str, Path],
    weight_change: Mapping[str, float],
    device: torch.device,
) -> TransferReport | None:
    """Before/after figures of the trained models against the pool, on the report data."""
    if cfg.report_data is None:
        return None
    before, after = report_specs(learners, pool_specs, checkpoints)
    return pool_report(cfg, before, after, cfg.out_dir, device, weight_change)


def finish_run(
    cfg: TrainConfig,
    learners: list[Learner],
    pool_specs: Mapping[str, ModelSpec],
    history: list[EpochRecord],
    device: torch.device,
    dist_context: DistContext,
    skipped: int,
) -> TrainResult:
    """The finished run's result; on the main rank with its weight changes and its report."""
    checkpoints = {m.name: cfg.out_dir / f"{m.name}.pt" for m in learners}
    changes = {}
    if dist_context.is_main:
        changes = weight_changes([m.before for m in learners], checkpoints)
        warn_if_barely_moved(changes)
    report = None
    if cfg.report and dist_context.is_main:
        report = run_report(cfg, learners, pool_specs, checkpoints, changes, device)
    return TrainResult(
        cfg.out_dir,
        checkpoints,
        cfg.out_dir / STATE_FILE,
        history,
        report,
        weight_change=changes,
        skipped=skipped,
    )
