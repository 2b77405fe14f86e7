"""`fastkd demo`: the main job on its embedded default (``fastkd.demo``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fastkd.cli import options
from fastkd.cli.guard import guarded

# Measured on 2 CPU cores without a GPU (README, bench/results/demo-cpu.json): the full demo
# (5 folds x 1 seed) in 11 min 43 s: 2.96 min of pools and dumps, shared by a fold's seeds, and
# 8.75 min of transfer per seed. --quick (with its tests) took 77 s alone, about 5 min while other
# jobs ran.
_POOL_MINUTES = 3.0  # every fold's pool and dump, 5 folds
_TRANSFER_MINUTES = 8.75  # every fold's transfer runs, 5 folds, one seed
_FOLDS = 5


def expected_duration(quick: bool, folds: int, seeds: int) -> str:
    """The one line the demo starts with: how long it should take, and on what, so that a wait
    on a slower or busy machine is expected rather than a hang."""
    if quick:
        took = "about 1-2 min"
    else:
        minutes = (_POOL_MINUTES + _TRANSFER_MINUTES * seeds) * folds / _FOLDS
        took = f"about {math.floor(minutes)}-{math.ceil(minutes) + 1} min"
    return f"expected: {took} on 2 CPU cores without a GPU; longer on a busy or slower machine"


def demo_command(
    quick: Annotated[
        bool,
        typer.Option(
            help="About 1-2 minutes: the same stages, arms and report on one fold with far fewer "
            "steps (a smoke test, not a result)."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder: report.json, report.png, report.txt, the runs "
            "(default: runs/demo; runs/demo-quick with --quick).",
            show_default=False,
        ),
    ] = None,
    folds: Annotated[
        int,
        typer.Option(
            min=3,
            help="Cross-validation folds (at least 3): each image is a test image of one fold; "
            "the time grows with folds x seeds.",
        ),
    ] = 5,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Transfer seeds per fold, numbered 0, 1, ... (count). With more than one, every "
            "interval resamples the seeds as well as the test images (so it covers the spread "
            "of training); the time grows with folds x seeds.",
        ),
    ] = 1,
    report_from: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Train nothing: recompute every table, interval and verdict from a saved "
            "report.json (its per-image predictions), print them, say whether they equal the "
            "saved numbers (exit code 1 when they do not), and write them to --out when given "
            "(never over the saved report). The training options are not read. Without it, "
            "the demo trains (or reuses) its runs and reports them.",
            show_default=False,
        ),
    ] = None,
    device: options.Device = "auto",
    backend: options.LoaderBackend = "auto",
    progress: options.ShowProgress = True,
) -> None:
    """Does deciding roles per sample beat plain distillation? Real data, about 12 minutes on
    2 CPU cores without a GPU (longer on a busy or slower machine).

    On scikit-learn's digits (16 px), per cross-validation fold: trains a pool of three timm
    architectures from scratch, each on its own part of the training split (all of six digits,
    a share of the rest) with its own recipe; dumps their outputs on 3 views of every training
    image; trains every member from the others in nine arms, each a mode of `fastkd train`:
    CE fine-tuning, plain KD, best-teacher KD, the KL+DP partition, offline Bi-KD, joint Bi-KD
    (no stop-gradient, as its code) and a label-free KL+DP partition, all with CE on the labels
    as Bi-KD's loss; and Roth et al.'s plain KL and KL+DP with their loss (KL only, T = 1, SGD);
    evaluates every run on the fold's test images.

    The report (printed, and report.json / .png / .txt in OUT) gives each member's change per
    arm with a 95% paired-bootstrap interval over test images (and seeds, with --seeds > 1),
    knowledge gain and loss, whether each member's change beats CE fine-tuning's, Roth et al.'s
    transfer metrics, the pool's agreement, and the verdict on three declared questions:
    offline Bi-KD minus plain KD (primary), minus CE fine-tuning (secondary), and Roth's KL+DP
    minus plain KL (third, with the knowledge each loses). report.json keeps every prediction
    and the code's commit: --report-from recomputes the report from it.

    Reuse: the digits folder, each fold's pool and store, and finished transfer runs are kept
    under OUT in folders keyed by a hash of their settings and of fastkd's code, and reused (or
    resumed, if cut short) by a later run with the same settings and code. Delete OUT to start
    over.
    """
    console = Console()
    if report_from is not None:
        from fastkd.demo import recompute_report
        from fastkd.demo.report import REPORT_STEM
        from fastkd.errors import ConfigError

        if out is not None and (out / f"{REPORT_STEM}.json").resolve() == report_from.resolve():
            raise ConfigError(
                f"--out {out} holds the report being recomputed ({report_from}): give another "
                "folder, so the saved report is kept"
            )
        _, same = recompute_report(report_from, out, console)
        if not same:
            raise typer.Exit(1)
        return
    console.print(expected_duration(quick, folds, seeds), style="dim", highlight=False)
    from fastkd.demo import DemoConfig, run_demo

    settings = {
        "out_dir": out or Path("runs/demo-quick" if quick else "runs/demo"),
        "folds": folds,
        "seeds": tuple(range(seeds)),
        "device": device,
        "backend": backend,
        "progress": progress,
    }
    cfg = DemoConfig.quick(**settings) if quick else DemoConfig(**settings)
    run_demo(cfg, console)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("demo")(guarded(demo_command))
