"""`fastkd demo`: the main job on its embedded default (``fastkd.demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# Registers the demo pool's timm architectures, so every command loads the demo's checkpoints.
import fastkd.digits  # noqa: F401
from fastkd.cli import options
from fastkd.cli.guard import guarded


def demo_command(
    quick: Annotated[
        bool,
        typer.Option(
            help="About a minute: the same stages, arms, seeds and report with far fewer steps "
            "(a smoke test, not a result)."
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Output folder: report.json, report.png, report.txt, the runs.")
    ] = Path("runs/demo"),
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds of the transfer stage (0, 1, ...): mean and spread.")
    ] = 3,
    device: options.Device = "auto",
    backend: options.LoaderBackend = "auto",
    progress: options.ShowProgress = True,
) -> None:
    """Real knowledge transfer on real data, end to end, on a CPU in at most 10 minutes.

    Writes scikit-learn's digits as a 32 px image folder (train/val/test); trains a pool of three
    timm architectures from scratch (a ResNet, a ViT and an MLP-Mixer); dumps their outputs on 8
    views of every training image into a store; trains every member from the others' stored
    targets in the partition modes live (Bi-KD) and fixed (KL+DP) and in two controls, plain KD
    (mode all) and cross-entropy fine-tuning for the same steps, for 3 seeds; evaluates all on
    the test split (weights selected on val) and prints and saves the report: per-member deltas
    (mean +/- std over seeds), the transfer arms against the controls, and a verdict computed
    from the numbers.

    Reuse: the digits folder, the pretrained pool and its store, and finished transfer runs are
    kept under OUT in folders keyed by a hash of their settings, and reused (or resumed, if cut
    short) by a later run with the same settings; other settings get fresh folders. Delete OUT to
    start over.
    """
    from fastkd.demo import DemoConfig, run_demo

    settings = {
        "out_dir": out,
        "seeds": tuple(range(seeds)),
        "device": device,
        "backend": backend,
        "progress": progress,
    }
    cfg = DemoConfig.quick(**settings) if quick else DemoConfig(**settings)
    run_demo(cfg, Console())


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("demo")(guarded(demo_command))
