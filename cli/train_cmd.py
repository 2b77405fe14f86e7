"""`fastkd train` and `fastkd eval`: parse the options, call ``fastkd.training`` / ``fastkd.metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fastkd.cli import options
from fastkd.cli.augment_options import with_view_options
from fastkd.cli.guard import guarded
from fastkd.data import open_dataset
from fastkd.errors import ConfigError
from fastkd.evaluation import predict_checkpoints, transfer_from_checkpoints
from fastkd.files import write_json
from fastkd.models import parse_pool
from fastkd.partition import PartitionMode, PartitionScore
from fastkd.training import DEFAULT_LR, Teachers, TrainConfig, TrainResult, train, train_all
from fastkd.views import AugmentConfig

_MODEL_HELP = (
    "A pool member with its weights, \\[alias:]ARCH=CKPT (repeat). The name (alias, else the "
    "checkpoint's stem) is its key in the store, whose sha256 it must match. Needed by --all, "
    "--teachers live and --joint; with offline teachers they add the pool to the final report."
)


def train_command(
    data: Annotated[Path, typer.Option(help="Training images: an image folder or a file list.")],
    data_root: options.DataRoot = None,
    store: Annotated[
        Path | None, typer.Option(help="Stored targets from `fastkd dump` (offline teachers).")
    ] = None,
    student: Annotated[
        str | None,
        typer.Option(
            help="The model to train, \\[alias:]ARCH[=CKPT]. Without CKPT: timm's pretrained "
            "weights, or a random init with --from-scratch."
        ),
    ] = None,
    train_every_member: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Train every pool member in turn, each taught by the others (role-agnostic).",
        ),
    ] = False,
    mode: Annotated[
        PartitionMode,
        typer.Option(
            help="What each sample is taught. live (offline Bi-KD): the best teacher, only where "
            "it beats the current student; fixed (KL+DP): the best of the teachers and the "
            "student's stored initial self; best (best-teacher KD): the best teacher on every "
            "sample; plain (plain KD): the mean of the teachers' distributions at the "
            "temperature on every sample, no label, no partition. Best = highest "
            "--partition-score."
        ),
    ] = PartitionMode.LIVE,
    partition_score: Annotated[
        PartitionScore,
        typer.Option(
            help="What the partition compares, for teachers and student alike. label: log p(y), "
            "the confidence in the true class; confidence: max_c log p(c), the confidence in "
            "the model's own top class, so no label decides who teaches (with --mode fixed: "
            "Roth et al.'s unsupervised KL+DP). Not with --joint; plain ignores it."
        ),
    ] = PartitionScore.LABEL,
    teachers: Annotated[
        Teachers,
        typer.Option(
            help="offline: the store's targets, no teacher runs; live: the pool runs forward "
            "every step (the baseline); none: cross-entropy only (the control)."
        ),
    ] = Teachers.OFFLINE,
    joint: Annotated[
        bool,
        typer.Option(help="Bi-KD: train all --model members at once with the bidirectional loss."),
    ] = False,
    model: Annotated[list[str] | None, typer.Option(help=_MODEL_HELP)] = None,
    member: Annotated[
        list[str] | None,
        typer.Option(help="Only these pool members teach (repeat; default: the whole pool)."),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch, split over ranks.")] = 128,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    lr: Annotated[
        float | None,
        typer.Option(
            help=f"Learning rate; default {DEFAULT_LR['adam']:g} for adam (Bi-KD), "
            f"{DEFAULT_LR['sgd']:g} for sgd (KL+DP): the papers' settings for ImageNet-pretrained "
            "models on ImageNet-scale data. Small models, small data or few epochs barely move "
            "at these (the report warns when weights moved < 0.1%): try ~1e-3, as from scratch."
        ),
    ] = None,
    weight_decay: float = 1e-5,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    lr_schedule: Annotated[str, typer.Option(help="constant or cosine (per step).")] = "constant",
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    stop_grad: Annotated[
        bool, typer.Option(help="--joint: no KD gradient into the teaching model.")
    ] = True,
    seed: int = 0,
    views: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Without a store: views per sample (view 0 = eval view; default 1). Not with "
            "--store: a store has the views it was dumped with.",
            show_default=False,
        ),
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option(help="A student without CKPT starts from a random init.")
    ] = False,
    input_size: Annotated[
        int | None, typer.Option(help="Override the student's input size (pixels, square).")
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option(help="Held-out split of the training data: model selection (never test)."),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--test-data",
            "--eval-data",
            help="Held-out data of the final transfer report, used for nothing else (default: "
            "--val-data, which also selected the weights: the report then says it is "
            "optimistic).",
        ),
    ] = None,
    control: Annotated[
        bool,
        typer.Option(
            help="Also train the cross-entropy control (--teachers none, the same settings and "
            "seed, in OUT/control) and report each model's top-1 minus the control's with a 95% "
            "interval, so a change the control also shows (fine-tuning, batch norm statistics) "
            "is not credited to teaching. Doubles the training time.",
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, history, report.")] = Path(
        "runs/train"
    ),
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    device: options.Device = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU.")] = True,
    backend: options.LoaderBackend = "auto",
    workers: options.Workers = None,
    progress: options.ShowProgress = True,
    *,
    augment: AugmentConfig,  # the view options (augment_options.with_view_options)
) -> None:
    """Train a pool member (or, with --all, every member in turn) from the others' stored targets.

    Each step rebuilds the images of the epoch's (sample, view) rows from the stored crops and
    flips and reads the stored targets of exactly those rows; the partitioned KD loss runs in one
    fused kernel. Checkpoints every epoch; --resume continues bit-exactly. Multi-GPU / multi-node:
    launch with torchrun (one process per GPU). Without --store, views are drawn from --seed
    with the view-augmentation options; with one, they are the store's.
    """
    console = Console()
    if train_every_member and (student is not None or joint):
        raise ConfigError("--all trains every pool member in turn: leave out --student/--joint")
    refused = _views_with_store(views, store)
    try:
        cfg = TrainConfig(
            data=data,
            data_root=data_root,
            student=student,
            store=store,
            models=tuple(model or ()),
            members=tuple(member or ()),
            teachers=teachers,
            mode=mode,
            partition_score=partition_score,
            joint=joint,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            lr_schedule=lr_schedule,
            temperature=temperature,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
            stop_grad=stop_grad,
            seed=seed,
            views=1 if views is None or refused else views,
            augment=augment,
            pretrained=not from_scratch,
            input_size=input_size,
            val_data=val_data,
            eval_data=eval_data,
            control=control,
            out_dir=out,
            resume=resume,
            device=device,
            amp=amp,
            backend=backend,
            num_workers=workers,
            progress=progress,
        )
    except ConfigError as error:
        if refused is None:
            raise
        raise ConfigError(f"{error}; {refused}") from None  # every problem in one message
    if refused is not None:
        raise ConfigError(f"invalid training configuration: {refused}")
    if train_every_member:
        pool = train_all(cfg)
        runs, report = pool.runs, pool.report
    else:
        run = train(cfg)
        runs, report = {name: run for name in run.checkpoints}, run.report
    _print_runs(console, runs)
    if report is not None:
        console.print(report.table())
        for line in report.caveats():
            console.print(Text(line, style="yellow"))
        console.print(escape(f"report: {out / 'report.json'}, {out / 'report.png'}"))


def _views_with_store(views: int | None, store: Path | None) -> str | None:
    """Why --views cannot go with --store (None when it is not given with one): the store's
    views are the ones it was dumped with, so even --views 1 would be ignored."""
    if views is None or store is None:
        return None
    return (
        f"--views {views} with --store: a store has the views it was dumped with "
        "(`fastkd dump --views`); leave out --views"
    )


def _print_runs(console: Console, runs: dict[str, TrainResult]) -> None:
    """One line per trained model; names and paths as ``Text``, so no bracket is read as markup."""
    for name, run in runs.items():
        console.print(Text.assemble((name, "bold"), f": selected weights {run.checkpoints[name]}"))


def eval_command(
    data: Annotated[Path, typer.Option(help="Evaluation images (e.g. the test split).")],
    model: Annotated[
        list[str],
        typer.Option(help="A model to evaluate, \\[alias:]ARCH=CKPT (repeat): the trained ones."),
    ],
    before: Annotated[
        list[str] | None,
        typer.Option(
            help="The pool before training, \\[alias:]ARCH=CKPT (repeat), matched to --model by "
            "name: adds the transfer delta, knowledge gain/loss, flips and transfer rates."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write OUT.json and OUT.png (the plot) here.")
    ] = None,
    batch_size: int = 256,
    device: options.Device = "cpu",
    backend: options.LoaderBackend = "auto",
) -> None:
    """Top-1 of every model; with --before, the transfer report: delta, knowledge gain and
    loss, positive flips against each other member before and after, transfer rates (Roth's
    per class, and per sample), how many trained models improved."""
    console = Console()
    after = parse_pool(model)
    if before:
        report = transfer_from_checkpoints(
            data,
            parse_pool(before),
            after,
            batch_size=batch_size,
            device=device,
            backend=backend,
        )
        console.print(report.table())
        if out is not None:
            paths = report.save(out)
            console.print(escape(f"report: {paths[0]}, {paths[1]}"))
        return
    dataset = open_dataset(data)
    predictions = predict_checkpoints(
        dataset, after, batch_size=batch_size, device=device, backend=backend
    )
    top1 = {name: 100.0 * float((p == dataset.labels).mean()) for name, p in predictions.items()}
    table = Table(title=escape(f"Top-1 on {len(dataset)} samples of {data}"))
    table.add_column("model")
    table.add_column("checkpoint")
    table.add_column("top-1 (%)", justify="right")
    for spec in after:
        where = str(spec.checkpoint or spec.arch)
        table.add_row(escape(spec.name), escape(where), f"{top1[spec.name]:.2f}")
    console.print(table)
    if out is not None:
        write_json(out.with_suffix(".json"), {"num_samples": len(dataset), "top1": top1})


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("train")(guarded(with_view_options(train_command)))
    app.command("eval")(guarded(eval_command))
