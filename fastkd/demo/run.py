"""The demo's stages: data, pool, dump, transfer, each the library code a ``fastkd`` command runs.

The demo only picks the settings (``fastkd.demo.config``), runs every stage for every fold and
hands the test predictions to ``fastkd.demo.report``; every stage is reused or resumed through the
library's own resume, so a second run with the same settings trains nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from fastkd.choices import Teachers
from fastkd.data import open_dataset
from fastkd.demo.config import (
    ARMS,
    IMAGE_SIZE,
    PREDICTIONS_FILE,
    Arm,
    DemoConfig,
    DemoLayout,
    code_version,
)
from fastkd.demo.predictions import FoldPredictions
from fastkd.demo.provenance import provenance
from fastkd.demo.report import REPORT_STEM, DemoReport
from fastkd.digits import (
    PoolMember,
    digits_labels,
    fold_splits,
    sample_of,
    write_digits_folder,
    write_fold_lists,
    write_sample_list,
)
from fastkd.dump import DumpConfig, run_dump
from fastkd.errors import ConfigError
from fastkd.evaluation import predict_checkpoints
from fastkd.files import write_json
from fastkd.models import ModelSpec, parse_pool
from fastkd.outputs import claim_output_folder
from fastkd.runtime import reproducible, resolve_device
from fastkd.training import TrainConfig, train, train_all


@contextmanager
def _stage(console: Console, title: str, seconds: dict[str, float], key: str) -> Iterator[None]:
    console.rule(f"[bold]{title}")
    start = time.perf_counter()
    yield
    seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 2)


def _pretrain_config(cfg: DemoConfig, layout: DemoLayout, member: PoolMember) -> TrainConfig:
    """Cross-entropy from a random init on the member's part of the fold's train split, a fresh
    view per epoch, weights selected on the fold's val split."""
    return TrainConfig(
        data=layout.data / layout.member_list_name(member.name),
        student=member.spec,
        teachers=Teachers.NONE,
        pretrained=False,
        model_kwargs=dict(member.model_kwargs),
        epochs=member.epochs,
        views=member.epochs,  # every epoch shows each image in a view it has not shown yet
        augment=cfg.augment,
        lr=member.lr,
        lr_schedule="cosine",
        batch_size=member.batch_size,
        seed=cfg.pool_seed,
        val_data=layout.split("val"),
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
    """Every member of the fold's pool trained by ``arm`` on the fold's whole train split and its
    stored views; weights selected on the fold's val split; no report (the demo evaluates)."""
    return TrainConfig(
        data=layout.split("train"),
        store=layout.store,
        models=tuple(pool_specs),
        epochs=cfg.transfer_epochs,
        lr=arm.lr(cfg.transfer_lr, cfg.batch_size),
        batch_size=cfg.batch_size,
        seed=seed,
        val_data=layout.split("val"),
        report=False,
        out_dir=layout.transfer(seed, arm.name),
        resume=True,
        device=cfg.device,
        backend=cfg.backend,
        progress=cfg.progress,
        loss=arm.loss,
        **arm.run_fields,
    )


def _predict(
    cfg: DemoConfig, layout: DemoLayout, models: Sequence[ModelSpec], path: Path
) -> FoldPredictions:
    """Test predictions of ``models`` (with their checkpoints), cached in ``path`` (written
    last: a finished stage is one whose predictions file exists)."""
    if path.is_file():
        return FoldPredictions.from_dict(json.loads(path.read_text()))
    test = open_dataset(layout.split("test"))
    found = predict_checkpoints(
        test, models, batch_size=256, device=resolve_device(cfg.device), backend=cfg.backend
    )
    predictions = FoldPredictions(
        fold=layout.fold,
        samples=[sample_of(key) for key in test.keys],
        labels=test.labels.tolist(),
        predictions={spec.name: found[spec.name].tolist() for spec in models},
    )
    write_json(path, predictions.to_dict())
    return predictions


def pretrain_pool(
    cfg: DemoConfig, console: Console | None = None, fold: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train (or reuse) every pool member on its part of ``fold``'s train split: their
    descriptions and their ``alias:ARCH=CKPT`` specs. Public so that other code (the benchmarks)
    gets the very pool the demo trains, from the same cache."""
    console = console or Console()
    layout = DemoLayout.of(cfg, fold)
    write_digits_folder(layout.data, image_size=IMAGE_SIZE)
    write_fold_lists(layout.data, cfg.folds, layout.fold, cfg.pool_seed)
    train_samples = fold_splits(cfg.folds, layout.fold, cfg.pool_seed)["train"]
    labels = digits_labels()
    pool_info, pool_specs = [], []
    for member in cfg.pool:
        part = member.pretraining_samples(train_samples, labels, cfg.pool_seed + layout.fold)
        write_sample_list(layout.data, layout.member_list_name(member.name), part)
        console.print(
            f"[bold]{member.name}[/bold]: {member.arch}, {member.epochs} epochs on {len(part)} "
            f"of {len(train_samples)} training images"
        )
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
                "focus": list(member.focus),
                "rest_fraction": member.rest_fraction,
                "images": len(part),
                "checkpoint": layout.relative(checkpoint),
                "val_top1": best,
            }
        )
    return pool_info, pool_specs


def _dump(cfg: DemoConfig, layout: DemoLayout, pool_specs: Sequence[str]) -> None:
    run_dump(
        DumpConfig(
            data=layout.split("train"),
            models=list(pool_specs),
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


def _transfer(
    cfg: DemoConfig, layout: DemoLayout, pool_specs: Sequence[str], arm: Arm, seed: int
) -> FoldPredictions:
    """Train every member by ``arm`` (or reuse a finished run) and predict the test split.

    A finished run keeps its selected weights and predictions, not its resumable state (three
    times the weights: the optimiser's moments); an interrupted one resumes from that state.
    """
    out = layout.transfer(seed, arm.name)
    predictions = out / PREDICTIONS_FILE
    if predictions.is_file():
        return FoldPredictions.from_dict(json.loads(predictions.read_text()))
    train_cfg = _transfer_config(cfg, layout, pool_specs, arm, seed)
    if train_cfg.joint:
        result = train(train_cfg)
        checkpoints, states = dict(result.checkpoints), [result.state]
    else:
        pool = train_all(train_cfg)
        checkpoints = {name: run.checkpoints[name] for name, run in pool.runs.items()}
        states = [run.state for run in pool.runs.values()]
    archs = {member.name: member.arch for member in cfg.pool}
    trained = [ModelSpec(archs[name], path, name) for name, path in checkpoints.items()]
    found = _predict(cfg, layout, trained, predictions)
    for state in states:
        state.unlink(missing_ok=True)
    return found


def run_demo(cfg: DemoConfig | None = None, console: Console | None = None) -> DemoReport:
    """Run (or reuse) every stage of every fold and write the report under ``cfg.out_dir``."""
    cfg = cfg or DemoConfig()
    with reproducible(cfg.device) as numerics:
        return _run_demo(cfg, console or Console(), numerics)


def _run_demo(cfg: DemoConfig, console: Console, numerics: dict[str, Any]) -> DemoReport:
    reports = [f"{REPORT_STEM}.{kind}" for kind in ("json", "png", "txt")]
    claim_output_folder(cfg.out_dir, "demo", ["digits", "pool", "transfer", *reports])
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    folds = cfg.run_folds
    pools: dict[int, list[dict[str, Any]]] = {}
    before: dict[int, FoldPredictions] = {}
    after: dict[str, dict[int, dict[int, FoldPredictions]]] = {a.name: {} for a in ARMS}
    for fold in folds:
        layout = DemoLayout.of(cfg, fold)
        where = f"fold {fold + 1} of {cfg.folds}"
        with _stage(
            console, f"{where}: pool, each member on its part of the data", seconds, "pool"
        ):
            pools[fold], specs = pretrain_pool(cfg, console, fold)
            before[fold] = _predict(cfg, layout, parse_pool(specs), layout.pool_predictions)
        with _stage(console, f"{where}: dump, {cfg.views} views per image", seconds, "dump"):
            _dump(cfg, layout, specs)
        title = f"{where}: transfer, {len(ARMS)} arms x {len(cfg.seeds)} seeds"
        with _stage(console, title, seconds, "transfer"):
            for seed in cfg.seeds:
                for arm in ARMS:
                    flags = arm.flags(cfg.transfer_lr, cfg.batch_size)
                    console.print(f"[bold]{arm.title}[/bold] ({flags}), seed {seed}")
                    found = _transfer(cfg, layout, specs, arm, seed)
                    after[arm.name].setdefault(fold, {})[seed] = found
    seconds["total"] = round(time.perf_counter() - start, 2)

    report = DemoReport.build(
        config=cfg.to_dict(),
        pool=pools,
        before=before,
        after=after,
        seconds=seconds,
        numerics=numerics,
        resamples=cfg.resamples,
        provenance=provenance(cfg.device),
    )
    console.rule("[bold]report")
    report.print(console)
    paths = report.save(cfg.out_dir)
    console.print(Text(f"report: {paths['json']}, {paths['plot']}, {paths['table']}"))
    return report


def recompute_report(
    path: Path, out_dir: Path | None = None, console: Console | None = None
) -> tuple[DemoReport, bool]:
    """Every table, interval and verdict of the saved report ``path`` computed again from its
    predictions, without training: the report, and whether its numbers equal the saved ones
    (they differ where the analysis code changed). Written to ``out_dir`` when given."""
    console = console or Console()
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--report-from {path}: cannot read a demo report: {error}") from error
    report = DemoReport.recompute(saved)
    same = json.dumps(report.summary, sort_keys=True) == json.dumps(
        saved.get("summary"), sort_keys=True
    )
    made = saved.get("provenance", {})
    verdict = "every number equals" if same else "some numbers differ from"
    console.rule(f"[bold]report recomputed from {path}")
    report.print(console)
    console.print(
        Text(
            f"measured with code {made.get('code_version', '?')[:12]} "
            f"(commit {(made.get('git') or {}).get('commit', 'unknown')}), "
            f"recomputed with {code_version()[:12]}: {verdict} the saved report's"
        )
    )
    if out_dir is not None:
        paths = report.save(out_dir)
        console.print(Text(f"report: {paths['json']}, {paths['plot']}, {paths['table']}"))
    return report, same
