"""`fastkd inspect STORE`: the manifest, array sizes, bytes per stored view, compression ratio."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fastkd.cli import options
from fastkd.cli.guard import guarded
from fastkd.errors import StoreError

if TYPE_CHECKING:  # the store imports zarr: only when the command runs
    from fastkd.store import ModelEntry, StoreSummary


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _render(summary: StoreSummary, console: Console) -> None:
    m, layout = summary.manifest, summary.layout
    state = "complete" if summary.blocks_done == layout.num_blocks else "INCOMPLETE"
    console.print(
        f"[bold]fastkd store[/bold] format {m.format_version} (written by fastkd {m.fastkd_version}): "
        f"{m.num_samples:,} samples x {m.views} views, {m.num_classes} classes, seed {m.seed}\n"
        f"fingerprint {m.fingerprint}\n"
        f"blocks {summary.blocks_done}/{layout.num_blocks} done ({state}), "
        f"{layout.samples_per_shard} samples per shard, {summary.num_files} files; "
        f"augment {escape(str(m.augment))}"
    )
    models = Table(title="Pool")
    for column in ("model", "arch", "checkpoint sha256", "classes", "stored", "input", "B/view"):
        models.add_column(column, justify="right" if column in {"classes", "B/view"} else "left")
    for entry in m.models:
        config = entry.data_config
        models.add_row(
            Text(entry.name),
            Text(entry.arch),
            (entry.checkpoint_sha256 or "-")[:16],
            str(entry.num_classes),
            _stored(entry),
            f"{config.get('input_size')} {config.get('interpolation', '')} crop {config.get('crop_pct', '-')}",
            f"{summary.bytes_per_view(entry.name):.2f}",
        )
    console.print(models)

    arrays = Table(title="Arrays")
    for column in ("array", "shape", "dtype", "decoded", "stored", "B/view", "ratio"):
        arrays.add_column(column, justify="left" if column in {"array", "dtype"} else "right")
    rows = m.num_samples * m.views
    for a in summary.arrays:
        arrays.add_row(
            Text(a.path),
            " x ".join(map(str, a.shape)),
            a.dtype,
            _size(a.nbytes) if a.nbytes else "-",
            _size(a.nbytes_stored),
            f"{a.nbytes_stored / rows:.2f}",
            f"{a.nbytes / a.nbytes_stored:.2f}" if a.nbytes and a.nbytes_stored else "-",
        )
    console.print(arrays)
    console.print(
        f"shared arrays {summary.bytes_per_view(None):.2f} B/view; overall compression ratio "
        f"{summary.compression_ratio:.2f}"
    )
    if summary.skipped:
        shown = ", ".join(summary.skipped[:10])
        more = f" and {len(summary.skipped) - 10} more" if len(summary.skipped) > 10 else ""
        message = Text(f"{len(summary.skipped)} skipped (unreadable) samples:", style="yellow")
        console.print(message.append(f" {shown}{more}", style="default"))


def inspect(
    store: Annotated[
        str,
        typer.Argument(
            help="A fastkd store (from `fastkd dump`): a directory or an s3://bucket/prefix URL."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also decode every written block of every array and check it against the "
            "content hash recorded when it was written (and its class ids against the "
            "manifest's classes, as training does); list the damaged ones and exit non-zero "
            "(`fastkd dump --repair` rewrites them).",
        ),
    ] = False,
    progress: options.ShowProgress = True,
    storage_option: options.StorageOption = None,
) -> None:
    """Print a store's manifest, array sizes, bytes per stored view and compression ratio."""
    from fastkd.storage import configure

    configure(storage_option, store)  # first: every s3:// URL of the command uses them
    from fastkd.store import check_store, summarize

    summary = summarize(store)
    if as_json:
        payload = asdict(summary)
        payload["bytes_per_view"] = {
            m.name: summary.bytes_per_view(m.name) for m in summary.manifest.models
        }
        payload["compression_ratio"] = summary.compression_ratio
        typer.echo(json.dumps(payload, indent=2))
    else:
        _render(summary, Console())
    if summary.unreadable and not verify:
        raise StoreError(
            f"store {store} is damaged: its {' and '.join(summary.unreadable)} array cannot be "
            "decoded; `fastkd inspect --verify` names the damaged blocks"
        )
    if verify:
        bad = check_store(store, progress=progress)
        if bad:
            raise StoreError(
                f"{len(bad)} damaged block(s) in {store}:\n  "
                + "\n  ".join(problem.describe() for problem in bad)
                + "\nrewrite them: run the `fastkd dump` command that made the store with --repair"
            )
        Console(stderr=True).print(
            Text(f"verified: every written block of {store} is as its writer recorded it")
        )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("inspect")(guarded(inspect))


def _stored(entry: ModelEntry) -> str:
    """How a model's targets are stored, in a few words: dense, or top-k with its tail."""
    if not entry.topk:
        return "dense"
    draws = f" x{entry.tail_samples}" if entry.tail_samples else ""
    return f"top-{entry.topk}, {entry.tail} tail{draws}"
