"""``fastkd bench targets``'s transfer part: the demo end to end, dense vs sparse targets.

The demo runs once with dense targets and once with top-3 sparse targets under each tail model;
each sparse run's test top-1 after transfer is set against the dense run's, paired by (arm,
fold, seed, member), and its validation curve against the dense run's epoch by epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fastkd.bench.target_errors import DENSE, Setting, rounded
from fastkd.bench.targets_pool import demo_config
from fastkd.compression import TailModel
from fastkd.demo.config import ARMS, PREDICTIONS_FILE, DemoConfig, DemoLayout
from fastkd.demo.predictions import FoldPredictions
from fastkd.demo.run import run_demo
from fastkd.training import HISTORY_FILE

# The demo's arms that read the stored targets (fastkd.demo.config.ARMS, by name).
KD_ARMS = ("plain", "best", "kl_dp", "bikd", "kl_dp_free")
DIGITS_CLASSES = 10


def transfer_settings(samples: int) -> list[Setting]:
    return [
        DENSE,
        Setting(TailModel.UNIFORM.value, 3),
        Setting(TailModel.BUCKET.value, 3),
        Setting(TailModel.SAMPLED.value, 3, samples),
    ]


Key = tuple[str, int, int, str]  # (arm, fold, seed, member)


def _runs(cfg: DemoConfig) -> dict[tuple[str, int, int], Path]:
    """Each transfer run's folder, per (arm, fold, seed)."""
    return {
        (arm.name, fold, seed): DemoLayout.of(cfg, fold).transfer(seed, arm.name)
        for arm in ARMS
        for fold in cfg.run_folds
        for seed in cfg.seeds
    }


def _top1_after(cfg: DemoConfig, members: Sequence[str]) -> dict[Key, float]:
    """Test top-1 of every member after each transfer run, from the run's saved predictions."""
    out = {}
    for (arm, fold, seed), run in _runs(cfg).items():
        found = FoldPredictions.from_dict(json.loads((run / PREDICTIONS_FILE).read_text()))
        for member in members:
            out[(arm, fold, seed, member)] = 100.0 * float(found.correct(member).mean())
    return out


def _histories(cfg: DemoConfig, members: Sequence[str]) -> dict[Key, list[dict]]:
    """Each transfer run's epoch records (``fastkd.training``'s history), per (arm, fold, seed,
    member); a joint run keeps one history for the whole pool."""
    out = {}
    for (arm, fold, seed), run in _runs(cfg).items():
        for member in members:
            path = run / member / HISTORY_FILE
            out[(arm, fold, seed, member)] = json.loads(
                (path if path.is_file() else run / HISTORY_FILE).read_text()
            )
    return out


def _finished(cfg: DemoConfig) -> bool:
    """Whether every transfer run of ``cfg`` is already finished under its cache folder (then
    ``run_demo`` reads the runs back instead of training them)."""
    return all((run / PREDICTIONS_FILE).is_file() for run in _runs(cfg).values())


def _change(
    figures: dict[Key, float],
    dense: dict[Key, float],
    arms: Sequence[str],
) -> dict[str, Any]:
    """Top-1 after transfer minus the dense run's, paired by (arm, fold, seed, member): the mean
    (and its sample std) over the pairs of ``arms``, and per member."""
    diffs = {key: figures[key] - dense[key] for key in figures if key[0] in arms}
    values = list(diffs.values())
    members = sorted({key[-1] for key in diffs})
    return {
        "mean": rounded(float(np.mean(values))),
        "std": rounded(float(np.std(values, ddof=1))) if len(values) > 1 else None,
        "pairs": len(values),
        "per_member": {
            m: rounded(float(np.mean([d for k, d in diffs.items() if k[-1] == m]))) for m in members
        },
    }


def transfer_part(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The demo once per stored-target setting; each sparse run's test top-1 minus the dense
    run's, paired by (arm, seed, member)."""
    runs: dict[str, dict[str, Any]] = {}
    after: dict[str, dict[Key, float]] = {}
    history: dict[str, dict[Key, list[float]]] = {}  # val top-1 per epoch
    base = demo_config(args, seeds=tuple(args.transfer_seeds))
    quiet = Console(file=io.StringIO())
    arms: list[str] = []
    for setting in transfer_settings(args.transfer_tail_samples):
        cfg = replace(
            base,
            topk=setting.topk,
            tail=None if setting.tail == "dense" else setting.tail,
            tail_samples=setting.tail_samples or base.tail_samples,
        )
        console.print(f"transfer with {setting.label} targets")
        reused = _finished(cfg)
        start = time.perf_counter()
        report = run_demo(cfg, quiet)
        arms = report.arms
        after[setting.label] = _top1_after(cfg, report.members)
        records = _histories(cfg, report.members)
        history[setting.label] = {
            key: [r["val_top1"].get(key[-1]) for r in epochs] for key, epochs in records.items()
        }
        histories = {run / HISTORY_FILE for run in _runs(cfg).values()}  # joint runs
        histories |= {run / m / HISTORY_FILE for run in _runs(cfg).values() for m in report.members}
        summary = report.summary
        runs[setting.label] = {
            **setting.describe(DIGITS_CLASSES),
            "store": DemoLayout.of(cfg).relative(DemoLayout.of(cfg).store),
            "seconds": round(time.perf_counter() - start, 1),
            "reused_finished_runs": reused,
            "training_seconds": round(
                sum(
                    r["seconds"]
                    for path in histories
                    if path.is_file()
                    for r in json.loads(path.read_text())
                ),
                1,
            ),
            "pool_delta": {
                arm: rounded(stat["pool_delta"]["estimate"])
                for arm, stat in summary["arms"].items()
            },
            "top1_after": {
                arm: {m: rounded(stat["members"][m]["top1_after"]) for m in report.members}
                for arm, stat in summary["arms"].items()
            },
            "top1_before": {m: rounded(v) for m, v in summary["top1_before"].items()},
        }
    dense = after[DENSE.label]
    for label, figures in after.items():
        if label != DENSE.label:
            runs[label]["top1_change_vs_dense"] = {
                **{arm: _change(figures, dense, [arm]) for arm in arms},
                "kd_arms": _change(figures, dense, KD_ARMS),
            }
            epochs = [
                (a != b, key[0])
                for key, values in history[label].items()
                for a, b in zip(values, history[DENSE.label][key], strict=True)
            ]
            runs[label]["val_top1_epochs_unlike_dense"] = {
                arm: [sum(d for d, a in epochs if a == arm), sum(a == arm for _, a in epochs)]
                for arm in arms
            }
    return {
        "config": ("DemoConfig.quick" if args.quick else "DemoConfig")
        + f"(seeds={tuple(args.transfer_seeds)})",
        "demo_config": base.to_dict(),
        "seeds": {"transfer": list(base.seeds), "pool_and_store_views": base.pool_seed},
        "note": (
            "top-1 in % of the test images of the folds run (one fold's image is about 0.28 "
            "points); top1_after: per arm and member, over those images, mean over seeds; "
            "top1_change_vs_dense: this run's top-1 after transfer minus the dense run's, paired "
            "by (fold, seed, member), per arm and over the KD "
            "arms (plain, best, kl_dp, bikd, kl_dp_free); the ce and joint arms read no stored "
            "targets, so their change shows the runs' own noise. At 10 classes a dense view is 24 raw bytes, as many as top-3 "
            "sparse: this part shows what each tail does to training, not a saving. "
            "val_top1_epochs_unlike_dense: per arm, [epochs whose val top-1 differs from the "
            "dense run's, epochs] over (fold, seed, member): whether the training itself changed. "
            "seconds: this invocation's; reused_finished_runs: the runs were trained by an earlier "
            "invocation with the same settings under --cache and read back; training_seconds: "
            "the transfer runs' epochs as their histories record them (when they were trained)"
        ),
        "runs": runs,
    }
