"""Entry points: train one student (or a joint pool), or every pool member in turn."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastkd.errors import ConfigError
from fastkd.metrics import TransferReport
from fastkd.models import ModelSpec, parse_pool
from fastkd.outputs import check_output_folder, claim_output_folder
from fastkd.runtime import join_job, on_main, resolve_device
from fastkd.store import StoreReader
from fastkd.training.config import TrainConfig
from fastkd.training.learners import spec_text
from fastkd.training.report import REPORT_STEM, control_config, pool_report
from fastkd.training.result import TrainResult
from fastkd.training.trainer import Trainer


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.student`` (or, with ``joint``, all ``cfg.models`` together). With
    ``control``, first the cross-entropy control (``report.control_config``); the report then
    gives each trained model's difference to it, and ``TrainResult.control`` is its run."""
    if not cfg.control:
        return Trainer(cfg).fit()
    trainer = Trainer(replace(cfg, report=False))  # checked and trained before the control
    result = trainer.fit()
    before, after = trainer.report_specs(result.checkpoints)
    device, is_main = trainer.device, trainer.dist.is_main
    del trainer  # its models and optimisers, before the control's
    result.control = Trainer(control_config(cfg)).fit()
    if cfg.report and cfg.report_data is not None and is_main:
        result.report = pool_report(
            cfg, before, after, cfg.out_dir, device, result.weight_change,
            result.control.checkpoints,
        )  # fmt: skip
    return result


@dataclass
class PoolResult:
    """``train_all``: each member's run, and the pool's transfer report."""

    runs: dict[str, TrainResult]
    report: TransferReport | None


def train_all(cfg: TrainConfig) -> PoolResult:
    """Every pool member in turn is the student of the others: role-agnostic transfer.

    The members are the store's (or ``cfg.members``); each needs its checkpoint in ``cfg.models``
    (``NAME=CKPT``, verified against the store's sha256). Member ``m`` trains in
    ``out_dir/m``; the pool's report (every member before and after) goes to ``out_dir``.
    """
    if cfg.joint:
        raise ConfigError("train_all trains the members one at a time; joint trains them together")
    pool = {spec.name: spec for spec in parse_pool(cfg.models)} if cfg.models else {}
    if cfg.store is not None:
        names = list(cfg.members) or StoreReader(cfg.store).model_names
    else:
        names = list(cfg.members) or list(pool)
    missing = [name for name in names if name not in pool]
    if missing:
        raise ConfigError(
            f"training every member needs each one's checkpoint: give --model NAME=CKPT for "
            f"{missing} (the pool is {names})"
        )
    writes = [*names, f"{REPORT_STEM}.json", f"{REPORT_STEM}.png"]
    device = resolve_device(cfg.device)
    job = join_job(device)
    check_output_folder(cfg.out_dir, "train", writes)  # every rank, before the main one marks
    on_main(job, lambda: claim_output_folder(cfg.out_dir, "train", writes))
    runs = {}
    for name in names:
        member = replace(
            cfg, student=spec_text(pool[name]), out_dir=cfg.out_dir / name, report=False
        )
        runs[name] = train(member)
    report = None
    if cfg.report and cfg.report_data is not None and job.is_main:
        after = [
            ModelSpec(pool[name].arch, run.checkpoints[name], name) for name, run in runs.items()
        ]
        control = (
            {name: run.control.checkpoints[name] for name, run in runs.items()}
            if cfg.control
            else None
        )
        changes = {name: c for run in runs.values() for name, c in run.weight_change.items()}
        report = pool_report(cfg, list(pool.values()), after, cfg.out_dir, device, changes, control)
    return PoolResult(runs, report)
