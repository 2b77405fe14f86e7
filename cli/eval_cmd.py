"""`fastkd eval`: top-1 of trained checkpoints and, with their pool before, the transfer report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fastkd.cli import options
from fastkd.cli.guard import guarded


def eval_command(
    data: Annotated[
        str,
        typer.Option(help=f"Evaluation images (e.g. the test split): {options.DATA_FORMS}."),
    ],
    model: Annotated[
        list[str],
        typer.Option(help="A model to evaluate, \\[alias:]ARCH=CKPT (repeat): the trained ones."),
    ],
    before: Annotated[
        list[str] | None,
        typer.Option(
            help="The pool before training, \\[alias:]ARCH=CKPT (repeat), matched to --model by "
            "name: adds the transfer delta, knowledge gain/loss, flips and transfer rates. "
            "Without it: top-1 only.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder, new or empty (or an earlier `fastkd eval` output): "
            "report.json, and with --before report.png (the plot). Default: print only.",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per forward pass of each model.")
    ] = 256,
    input_size: options.InputSize = None,
    device: options.Device = "cpu",
    backend: options.LoaderBackend = "auto",
    storage_option: options.StorageOption = None,
) -> None:
    """Top-1 of every model; with --before, the transfer report: delta, knowledge gain and
    loss, positive flips against each other member before and after, transfer rates (Roth's
    per class, and per sample), how many trained models improved."""
    from fastkd.storage import configure

    configure(storage_option, data)  # first: every s3:// URL of the command uses them
    from fastkd.data import open_dataset
    from fastkd.evaluation import predict_checkpoints, transfer_from_checkpoints
    from fastkd.files import write_json
    from fastkd.models import parse_pool
    from fastkd.outputs import claim_output_folder
    from fastkd.training import REPORT_STEM

    console = Console()
    after = parse_pool(model)
    if out is not None:  # refused before any model runs: a folder of the user's is never written
        claim_output_folder(out, "eval", [f"{REPORT_STEM}.json", f"{REPORT_STEM}.png"])
    if before:
        report = transfer_from_checkpoints(
            data,
            parse_pool(before),
            after,
            batch_size=batch_size,
            device=device,
            backend=backend,
            input_size=input_size,
        )
        console.print(report.table())
        if out is not None:
            paths = report.save(out / REPORT_STEM)
            console.print(escape(f"report: {paths[0]}, {paths[1]}"))
        return
    dataset = open_dataset(data)
    predictions = predict_checkpoints(
        dataset,
        after,
        batch_size=batch_size,
        device=device,
        backend=backend,
        input_size=input_size,
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
        path = write_json(out / f"{REPORT_STEM}.json", {"num_samples": len(dataset), "top1": top1})
        console.print(escape(f"report: {path}"))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("eval")(guarded(eval_command))
