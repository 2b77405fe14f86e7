"""`fastkd bench compile|kernels|host|store|dump|train|graphs|targets`: the benchmarks in ``fastkd.bench``.

Each benchmark keeps its own argument parser (so ``python -m fastkd.bench.<name>`` and the CLI
take the same options); this module only forwards the arguments after the benchmark's name.
``fastkd bench <name> --help`` prints that benchmark's options.
"""

from __future__ import annotations

import importlib

import typer

from fastkd.cli.guard import guarded

BENCHMARKS: dict[str, str] = {
    "compile": "Compile check of the KD kernels for sm_90 and sm_80 without a GPU: registers, "
    "spills, resident blocks per SM, load and store widths, exps per element (fails on a spill).",
    "kernels": "Fused KD kernels vs torch eager, torch.compile and Liger: forward + backward "
    "time, GB/s, % of peak bandwidth, peak memory.",
    "host": "Host microseconds per training loss call (forward + backward) with the device "
    "idle: on CPU with the Triton launches recorded, not run; the ATen operations it dispatches.",
    "store": "Store: bytes per stored view (synthetic 1000-class logits) and random-access "
    "read throughput in views/s on one core.",
    "dump": "Dump in steady state on photo-like JPEGs: the pool's forward alone (the ceiling), "
    "the loader alone and the whole dump per backend (DALI, torch, nvjpeg on a GPU), as ratios "
    "to the ceiling; bytes per stored view.",
    "train": "Training images/s through the real loader: plain cross-entropy vs offline stored "
    "targets vs live teachers (1, 2, 4), as ratios to cross-entropy, and the same steps on "
    "images decoded beforehand.",
    "graphs": "Training images/s eagerly and by CUDA-graph replay (fastkd train --cuda-graphs), "
    "resnet18 at 32 px on batches decoded beforehand: CE, offline, live and joint steps.",
    "targets": "Compressed targets vs the dense teacher: KL and gradient errors of each tail "
    "model at equal bytes (synthetic 1000 classes, the demo's pool), at top-k 5 and 10 on four "
    "row populations (confident, high-entropy, label-smoothed, the demo pool's outputs) with "
    "the default tail the criterion picks, and the demo's accuracy with sparse vs dense targets.",
}

_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True}


def _command(name: str, summary: str):
    def run(ctx: typer.Context) -> None:
        module = importlib.import_module(f"fastkd.bench.{name}")
        try:
            module.main(list(ctx.args), prog=f"fastkd bench {name}")
        except SystemExit as stop:  # argparse's --help and usage errors
            raise typer.Exit(stop.code if isinstance(stop.code, int) else 2) from None

    run.__doc__ = f"{summary} Options: fastkd bench {name} --help."
    return run


def register(app: typer.Typer) -> None:
    """Add ``fastkd bench`` and its sub-commands to the app."""
    bench = typer.Typer(
        help="Benchmarks; JSON results go to bench/results/ with the device name.",
        no_args_is_help=True,
    )
    for name, summary in BENCHMARKS.items():
        bench.command(name, context_settings=_FORWARD, add_help_option=False)(
            guarded(_command(name, summary))
        )
    app.add_typer(bench, name="bench")
