"""The ``fastkd`` command: each sub-command lives in its own module and only parses arguments."""

from __future__ import annotations

from typing import Annotated

import typer

from fastkd.cli import bench_cmd, demo_cmd, dump_cmd, eval_cmd, inspect_cmd, train_cmd

app = typer.Typer(
    name="fastkd",
    help=(
        "Offline, role-agnostic knowledge transfer across a pool of pretrained models: dump every "
        "model's per-view soft targets once, then train any member from the others."
    ),
    no_args_is_help=True,
    add_completion=False,
    # Bad input is one line on stderr (cli.guard); a bug's traceback, and every traceback with
    # --debug, is Python's own: complete and short enough to paste into an issue.
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="On an error, show the full Python traceback instead of the one-line message "
            "(for bug reports). Goes before the command: fastkd --debug dump ...",
        ),
    ] = False,
) -> None:
    """The options of every command (the guard reads --debug from the root context)."""
    _show_fastkd_log()


def _show_fastkd_log() -> None:
    """fastkd's own log lines (input sizes, a dump's blocks, warnings) on stderr in every
    command; other libraries' stay at Python's default (warnings only)."""
    import logging

    from rich.console import Console
    from rich.logging import RichHandler

    log = logging.getLogger("fastkd")
    if not any(isinstance(h, RichHandler) for h in log.handlers):
        log.addHandler(RichHandler(console=Console(stderr=True), show_path=False))
    log.setLevel(logging.INFO)


for _module in (dump_cmd, inspect_cmd, train_cmd, eval_cmd, demo_cmd, bench_cmd):
    _module.register(app)

if __name__ == "__main__":
    app()
