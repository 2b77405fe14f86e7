"""The ``fastkd`` command: each sub-command lives in its own module and only parses arguments."""

from __future__ import annotations

import typer

from fastkd.cli import bench_cmd, demo_cmd, dump_cmd, inspect_cmd, train_cmd

app = typer.Typer(
    name="fastkd",
    help=(
        "Offline, role-agnostic knowledge transfer across a pool of pretrained models: dump every "
        "model's per-view soft targets once, then train any member from the others."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for _module in (dump_cmd, inspect_cmd, train_cmd, demo_cmd, bench_cmd):
    _module.register(app)

if __name__ == "__main__":
    app()
