"""`fastkd train`: parse the options into a ``TrainConfig``, call ``fastkd.training``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fastkd.augment import AugmentConfig
from fastkd.choices import DEFAULT_BATCH_SIZE, DEFAULT_LR, PartitionMode, PartitionScore, Teachers
from fastkd.cli import options
from fastkd.cli.augment_options import with_view_options
from fastkd.cli.guard import guarded
from fastkd.errors import ConfigError
from fastkd.presets import PresetName, preset_help, preset_settings

if TYPE_CHECKING:  # the training imports torch, timm and the kernels: only when a command runs
    from fastkd.training import TrainResult

_MODEL_HELP = (
    "A pool member with its weights, \\[alias:]ARCH=CKPT (repeat). The name (alias, else the "
    "checkpoint's stem) is its key in the store, whose sha256 it must match. Needed by --all, "
    "--teachers live and --joint; with offline teachers they add the pool to the final report."
)


def train_command(
    data: Annotated[str, typer.Option(help=f"Training images: {options.DATA_FORMS}.")],
    data_root: options.DataRoot = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Stored targets from `fastkd dump` (offline teachers): a directory or an "
            "s3://bucket/prefix URL."
        ),
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
    preset: Annotated[PresetName | None, typer.Option(help=preset_help())] = None,
    mode: Annotated[
        PartitionMode | None,
        typer.Option(
            help="What each sample is taught. live (offline Bi-KD): the best teacher, only where "
            "it beats the current student; fixed (KL+DP): the best of the teachers and the "
            "student's stored initial self; best (best-teacher KD): the best teacher on every "
            "sample; plain (plain KD): the mean of the teachers' distributions at the "
            "temperature on every sample, no label, no partition. Best = highest "
            "--partition-score. Default live."
        ),
    ] = None,
    partition_score: Annotated[
        PartitionScore | None,
        typer.Option(
            help="What the partition compares, for teachers and student alike. label: log p(y), "
            "the confidence in the true class; confidence: max_c log p(c), the confidence in "
            "the model's own top class, so no label decides who teaches (with --mode fixed: "
            "Roth et al.'s unsupervised KL+DP). Not with --joint; plain ignores it. Default label."
        ),
    ] = None,
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
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Passes over the training samples (one stored view of each per pass). Default 10.",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images per optimizer step, all ranks together (split over the GPUs). Default "
            f"{DEFAULT_BATCH_SIZE}.",
        ),
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam or sgd. Default adam.")] = None,
    lr: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Learning rate of every trained model, or NAME=VALUE for one model (repeat; "
            f"e.g. --joint with --lr a=1e-3 --lr b=2e-3). Default {DEFAULT_LR['adam']:g} for "
            f"adam (Bi-KD), {DEFAULT_LR['sgd']:g} for sgd (KL+DP's base lr, which --preset kl-dp "
            "scales by batch/256): the papers' settings for ImageNet-pretrained models on "
            "ImageNet-scale data. Small models, small data or few "
            "epochs barely move at these (the report warns when weights moved < 0.1%): try "
            "~1e-3, as from scratch."
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help="The optimizer's L2 weight decay (>= 0). Default 1e-05 (Bi-KD's, for Adam)."
        ),
    ] = None,
    momentum: Annotated[
        float | None, typer.Option(help="SGD momentum, in [0, 1) (adam ignores it). Default 0.9.")
    ] = None,
    lr_schedule: Annotated[
        str | None,
        typer.Option(
            help="constant or cosine (per step, to 0 at the last epoch). Default constant."
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="KD temperature T (> 0): teacher and student distributions are softmax(z / T) "
            "and the KD term is scaled by T^2; the partition always compares at T = 1. Default 1."
        ),
    ] = None,
    kd_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of the KD term in the loss (>= 0): ce_weight x CE + kd_weight x T^2 x "
            "KL. Default 1."
        ),
    ] = None,
    ce_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of the cross-entropy on the labels in the loss (>= 0). Default 1."
        ),
    ] = None,
    stop_grad: Annotated[
        bool | None,
        typer.Option(
            help="--joint: no KD gradient into the teaching model. Default --stop-grad. Only "
            "--joint reads it (stored and live teachers never learn): --no-stop-grad without "
            "--joint is refused, and --preset bi-kd without --joint leaves it out and says so."
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the sample order, each epoch's view choice, the views without a "
            "store and a --from-scratch init."
        ),
    ] = 0,
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
        int | None,
        typer.Option(
            help="Override the student's input size, in pixels (square; default: the model's "
            "data config).",
            show_default=False,
        ),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            help="Held-out split of the training data: model selection (never test); a folder, "
            "a file list or tar shards, as --data."
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--test-data",
            "--eval-data",
            help="Held-out data of the final transfer report, used for nothing else (default: "
            "--val-data, which also selected the weights: the report then says it is "
            "optimistic); a folder, a file list or tar shards, as --data.",
        ),
    ] = None,
    control: Annotated[
        bool,
        typer.Option(
            help="Also train the cross-entropy control (--teachers none, the same settings and "
            "seed, in OUT/control; with --all, OUT/MEMBER/control) and report each model's top-1 "
            "minus the control's with a 95% interval over the report's images, so a change the "
            "control also shows (fine-tuning, batch norm statistics) is not credited to "
            "teaching. Needs --val-data or --test-data; doubles the training time.",
        ),
    ] = False,
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: checkpoints, history, report. A new or empty folder, or a run "
            "folder fastkd made (it never writes into a folder of other files)."
        ),
    ] = Path("runs/train"),
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its last checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Start the run in --out over (its state is replaced; a run folder only)."
        ),
    ] = False,
    device: options.Device = "auto",
    amp: Annotated[bool, typer.Option(help="bf16 autocast on GPU.")] = True,
    cuda_graphs: Annotated[
        bool,
        typer.Option(
            help="Replay each full batch's training step as a CUDA graph, captured after 3 "
            "warm-up steps (the short last batch of an epoch runs eagerly): one launch instead "
            "of hundreds, for small models or images whose steps wait on the host. One GPU."
        ),
    ] = False,
    torch_compile: Annotated[
        bool,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile each step's forward and loss as one graph (fullgraph: the "
            "learners, the live teachers, the KD op). The first steps are slow while it "
            "compiles, once for full batches and once for an epoch's short last batch. Needs a "
            "C++ compiler on CPU, Triton on a GPU (backend: $FASTKD_COMPILE_BACKEND, default "
            "inductor).",
        ),
    ] = False,
    backend: options.LoaderBackend = "auto",
    workers: options.Workers = None,
    progress: options.ShowProgress = True,
    storage_option: options.StorageOption = None,
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
    from fastkd.storage import configure

    configure(storage_option, data, store, val_data, eval_data)  # first: every s3:// URL of the command uses them
    from fastkd.training import REPORT_STEM, TrainConfig, train, train_all
    from fastkd.training.report import caveats

    console = Console()
    if train_every_member and (student is not None or joint):
        raise ConfigError("--all trains every pool member in turn: leave out --student/--joint")
    run_lr, model_lr = _learning_rates(lr or [])
    chosen = preset_settings(
        preset,
        joint=joint,
        teachers=teachers,
        mode=mode,
        partition_score=partition_score,
        temperature=temperature,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        stop_grad=stop_grad,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=run_lr,
        weight_decay=weight_decay,
        momentum=momentum,
        lr_schedule=lr_schedule,
    )
    cfg = TrainConfig(
        data=data,
        data_root=data_root,
        student=student,
        store=store,
        models=tuple(model or ()),
        members=tuple(member or ()),
        teachers=teachers,
        loss=chosen.loss,
        joint=joint,
        preset=None if chosen.preset is None else chosen.preset.value,
        preset_not_applied=chosen.not_applied,
        model_lr=model_lr,
        **chosen.optimiser,
        seed=seed,
        views=views,
        augment=augment,
        pretrained=not from_scratch,
        input_size=input_size,
        val_data=val_data,
        eval_data=eval_data,
        control=control,
        out_dir=out,
        resume=resume,
        overwrite=overwrite,
        device=device,
        amp=amp,
        cuda_graphs=cuda_graphs,
        torch_compile=torch_compile,
        backend=backend,
        num_workers=workers,
        progress=progress,
    )
    if chosen.note is not None:
        console.print(Text(chosen.note, style="yellow"))
    if train_every_member:
        pool = train_all(cfg)
        runs, report = pool.runs, pool.report
    else:
        run = train(cfg)
        runs, report = {name: run for name in run.checkpoints}, run.report
    _print_runs(console, runs)
    skipped = max((run.skipped for run in runs.values()), default=0)
    if skipped:
        message = f"{skipped} sample(s) left out of training: the dump skipped them (unreadable)"
        console.print(Text(message, style="yellow"))
    if report is not None:
        console.print(report.table())
        for line in caveats(report):
            console.print(Text(line, style="yellow"))
        stem = out / REPORT_STEM
        console.print(escape(f"report: {stem}.json, {stem}.png"))


def _learning_rates(texts: list[str]) -> tuple[float | None, dict[str, float]]:
    """--lr's values: the run's learning rate (a plain VALUE, once) and each named model's
    (NAME=VALUE, once a name)."""
    run_lr, model_lr = None, {}
    for text in texts:
        name, _, value = text.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--lr {text!r}: expected VALUE or NAME=VALUE, e.g. 1e-3") from None
        if (name in model_lr) if name else (run_lr is not None):
            raise ConfigError(
                f"--lr {text!r}: {'model ' + repr(name) if name else 'the run'} "
                "already has a learning rate; give each one once"
            )
        if name:
            model_lr[name] = number
        else:
            run_lr = number
    return run_lr, model_lr


def _print_runs(console: Console, runs: dict[str, TrainResult]) -> None:
    """One line per trained model; names and paths as ``Text``, so no bracket is read as markup."""
    for name, run in runs.items():
        console.print(Text.assemble((name, "bold"), f": selected weights {run.checkpoints[name]}"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("train")(guarded(with_view_options(train_command)))
