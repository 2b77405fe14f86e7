"""The demo's stages: data, pool, dump, transfer, each the library code a ``fastkd`` command runs.

The demo only picks the settings (``fastkd.demo.config``) and hands the transfer reports to
``fastkd.demo.report``; every stage is reused or resumed through the library's own resume, so a
second run with the same settings trains nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from fastkd.demo.config import ARMS, IMAGE_SIZE, Arm, DemoConfig, DemoLayout
from fastkd.demo.report import DemoReport
from fastkd.digits import PoolMember, write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.metrics import TransferReport
from fastkd.training import REPORT_STEM as TRAIN_REPORT_STEM
from fastkd.training import Teachers, TrainConfig, train, train_all


@contextmanager
def _stage(console: Console, title: str, seconds: dict[str, float], key: str) -> Iterator[None]:
    console.rule(f"[bold]{title}")
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 2)


def _pretrain_config(cfg: DemoConfig, layout: DemoLayout, member: PoolMember) -> TrainConfig:
    """Cross-entropy from a random init, a fresh view per epoch, weights selected on val."""
    return TrainConfig(
        data=layout.data / "train",
        student=member.spec,
        teachers=Teachers.NONE,
        pretrained=False,
        model_kwargs=dict(member.model_kwargs),
        epochs=member.epochs,
        views=member.epochs,  # every epoch shows each image in a view it has not shown yet
        augment=cfg.augment,
        lr=member.lr,
        lr_schedule="cosine",
        batch_size=cfg.batch_size,
        seed=cfg.pool_seed,
        val_data=layout.data / "val",
        report=False,
        out_dir=layout.pretraining(member.name),
        resume=True,
        device=cfg.device,
        backend=cfg.backend,
        progress=cfg.progress,
    )


def _transfer_config(
    cfg: DemoConfig, layout: DemoLayout, pool_specs: Sequence[str], arm: Arm, seed: int
) -> TrainConfig:
    """Every member taught by the others' stored targets (or CE only), test-split report."""
    return TrainConfig(
        data=layout.data / "train",
        store=layout.store,
        models=tuple(pool_specs),
        teachers=arm.teachers,
        mode=arm.mode,
        epochs=cfg.transfer_epochs,
        lr=cfg.transfer_lr,
        batch_size=cfg.batch_size,
        seed=seed,
        val_data=layout.data / "val",
        eval_data=layout.data / "test",
        out_dir=layout.transfer(seed, arm.name),
        resume=True,
        device=cfg.device,
        backend=cfg.backend,
        progress=cfg.progress,
    )


def _transfer(cfg: TrainConfig) -> TransferReport:
    """``train_all``, or the report of its finished run: ``train_all`` writes the report last.

    A finished run keeps its selected weights and report, not its resumable state (three times
    the weights: the optimiser's moments); an interrupted one resumes from that state.
    """
    finished = cfg.out_dir / f"{TRAIN_REPORT_STEM}.json"
    if finished.is_file():
        return TransferReport.from_dict(json.loads(finished.read_text()))
    result = train_all(cfg)
    if result.report is None:
        raise RuntimeError(f"train_all wrote no transfer report in {cfg.out_dir}")
    for run in result.runs.values():
        run.state.unlink(missing_ok=True)
    return result.report


def pretrain_pool(
    cfg: DemoConfig, console: Console | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train (or reuse) every pool member on the digits folder: their descriptions and their
    ``alias:ARCH=CKPT`` specs. Public so that other code (the benchmarks) gets the very pool the
    demo trains, from the same cache."""
    console = console or Console()
    layout = DemoLayout.of(cfg)
    write_digits_folder(layout.data, image_size=IMAGE_SIZE)
    pool_info, pool_specs = [], []
    for member in cfg.pool:
        console.print(f"[bold]{member.name}[/bold]: {member.arch}, {member.epochs} epochs")
        run = train(_pretrain_config(cfg, layout, member))
        checkpoint = run.checkpoints[member.name]
        best = max((r.val_top1[member.name] for r in run.history), default=math.nan)
        pool_specs.append(f"{member.spec}={checkpoint}")
        pool_info.append(
            {
                "name": member.name,
                "arch": member.arch,
                "model_kwargs": dict(member.model_kwargs),
                "epochs": member.epochs,
                "lr": member.lr,
                "checkpoint": layout.relative(checkpoint),
                "val_top1": best,
            }
        )
    return pool_info, pool_specs


def run_demo(cfg: DemoConfig | None = None, console: Console | None = None) -> DemoReport:
    """Run (or reuse) every stage and write the report under ``cfg.out_dir``."""
    cfg = cfg or DemoConfig()
    console = console or Console()
    layout = DemoLayout.of(cfg)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    with _stage(console, "1/4 data: scikit-learn digits, 32 px, train/val/test", seconds, "data"):
        write_digits_folder(layout.data, image_size=IMAGE_SIZE)

    with _stage(console, "2/4 pool: three architectures trained from scratch", seconds, "pool"):
        pool_info, pool_specs = pretrain_pool(cfg, console)

    with _stage(console, f"3/4 dump: {cfg.views} views per training image", seconds, "dump"):
        run_dump(
            DumpConfig(
                data=layout.data / "train",
                models=pool_specs,
                out=layout.store,
                views=cfg.views,
                topk=cfg.topk,
                tail=cfg.tail,
                tail_samples=cfg.dump_tail_samples,
                seed=cfg.pool_seed,
                augment=cfg.augment,
                backend=cfg.backend,
                device=None if cfg.device == "auto" else cfg.device,
                progress=cfg.progress,
            )
        )

    runs: dict[str, dict[int, TransferReport]] = {arm.name: {} for arm in ARMS}
    run_dirs: dict[str, dict[int, str]] = {arm.name: {} for arm in ARMS}
    title = f"4/4 transfer: {len(ARMS)} arms x {len(cfg.seeds)} seeds x {len(cfg.pool)} members"
    with _stage(console, title, seconds, "transfer"):
        for seed in cfg.seeds:
            for arm in ARMS:
                console.print(f"[bold]seed {seed}, {arm.name}[/bold]: {arm.description}")
                runs[arm.name][seed] = _transfer(
                    _transfer_config(cfg, layout, pool_specs, arm, seed)
                )
                run_dirs[arm.name][seed] = layout.relative(layout.transfer(seed, arm.name))
    seconds["total"] = round(time.perf_counter() - start, 2)

    report = DemoReport(
        config=cfg.to_dict(),
        pool=pool_info,
        test_data=layout.relative(layout.data / "test"),
        store=layout.relative(layout.store),
        runs=runs,
        run_dirs=run_dirs,
        seconds=seconds,
    )
    console.rule("[bold]report")
    report.print(console)
    paths = report.save(cfg.out_dir)
    console.print(f"report: {paths['json']}, {paths['plot']}, {paths['table']}")
    return report
