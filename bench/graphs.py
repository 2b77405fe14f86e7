"""CUDA graphs of a training step (``fastkd train --cuda-graphs``): images/s eager and replayed,
where the host bounds the step (resnet18 at 32 px).

The digits (``fastkd.digits``: 10 classes, 32 px images, the train split) and random-init
students and teachers (``fastkd.bench.pool``; speed does not depend on the weights); one teacher
is dumped once (one view) for the offline kind. Each kind, ``ce`` (``--teachers none``),
``offline`` (that teacher's stored targets), ``live`` (the teacher run forward every step) and
``joint`` (student and teacher trained together by Bi-KD), trains on the same full batches,
decoded beforehand and cycled (the loader is left out: the graph shortens the step, not the
loading), first eagerly, then with ``cuda_graphs=True``. The first ``--warmup`` steps (the
graph's warm-up and capture among them) are not timed. Results go to
``bench/results/graphs-gpu.json`` (``scripts/gpu-check`` names the device); on CPU, where graphs
are refused, only the eager rates are measured (a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fastkd.bench.device_defaults import resolve_with_defaults
from fastkd.bench.pool import random_checkpoint
from fastkd.bench.train import timed_steps
from fastkd.data import open_dataset
from fastkd.digits import write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.errors import ConfigError
from fastkd.runtime import machine_name
from fastkd.training import TrainConfig, Trainer
from fastkd.training.graphed_step import WARMUP_STEPS, graph_problems

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("ce", "offline", "live", "joint")
DEFAULTS = {  # (GPU, CPU)
    "arch": ("resnet18", "test_resnet"),
    "batch": (256, 16),
    "steps": (40, 2),
}


def make_pool(workdir: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The digits' train split, a student and a teacher checkpoint, the teacher's store."""
    data = write_digits_folder(workdir / "digits", image_size=args.input_size) / "train"
    if args.images is not None:  # the first images, as a file list (``fastkd.data``'s form)
        files = sorted(data.glob("*/*.png"))[: args.images]
        listing = data / "subset.txt"
        listing.write_text("".join(f"{f.parent.name}/{f.name} {f.parent.name}\n" for f in files))
        data = listing
    classes = open_dataset(data).num_classes
    specs = [
        f"{name}:{args.arch}="
        f"{random_checkpoint(workdir / f'{name}.pt', args.arch, classes, args.input_size, seed)}"
        for seed, name in enumerate(("student", "teacher"))
    ]
    store = run_dump(
        DumpConfig(
            data=data,
            models=[specs[1]],
            out=workdir / "store.zarr",
            views=1,
            batch_size=args.batch,
            backend="torch",
            num_workers=args.workers,
            device=str(device),
            progress=False,
        )
    )
    return {"data": data, "store": store, "student": specs[0], "teacher": specs[1]}


def configuration(
    kind: str, pool: dict[str, Any], args: argparse.Namespace, out: Path
) -> TrainConfig:
    common = {
        "data": pool["data"],
        "batch_size": args.batch,
        "lr": 1e-4,
        "device": args.device,
        "backend": "torch",
        "num_workers": args.workers,
        "progress": False,
        "report": False,
        "epochs": 1,
        "out_dir": out,
    }
    if kind == "ce":
        return TrainConfig(student=pool["student"], teachers="none", **common)
    if kind == "offline":
        return TrainConfig(student=pool["student"], store=pool["store"], **common)
    if kind == "live":
        return TrainConfig(
            student=pool["student"], teachers="live", models=(pool["teacher"],), **common
        )
    return TrainConfig(joint=True, models=(pool["student"], pool["teacher"]), **common)


def measure(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--warmup`` + ``--steps`` steps on the first ``--cached`` full batches, cycled."""
    trainer = Trainer(cfg)
    batches = list(itertools.islice(trainer.batches(trainer.plan(0)), args.cached))
    full = [batch for batch in batches if len(batch.samples) == cfg.batch_size]
    if not full:
        raise ConfigError(f"no full batch of {cfg.batch_size} images: give a smaller --batch")
    cycle = (full[i % len(full)] for i in range(args.warmup + args.steps))
    rate = timed_steps(trainer, cycle, args.warmup)
    graphed = trainer.graphed
    if graphed is not None:
        rate.update(graph_replays=graphed.replays, eager_steps=graphed.eager)
    del trainer, batches, full
    gc.collect()
    return rate


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, help="students and teacher (default resnet18)")
    parser.add_argument("--input-size", type=int, default=32, help="px (default 32)")
    parser.add_argument("--batch", type=int, default=None, help="default 256; CPU 16")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP_STEPS + 2,
        help=f"untimed first steps (default {WARMUP_STEPS + 2}: the graph's warm-up, capture "
        "and a replay)",
    )
    parser.add_argument("--cached", type=int, default=3, help="batches decoded beforehand")
    parser.add_argument(
        "--images", type=int, default=None, help="train on the first N (default: all, 1078)"
    )
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="default: all of " + ",".join(KINDS)
    )
    parser.add_argument("--workers", type=int, default=None, help="default: the loader's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/")
    args = parser.parse_args(argv)
    args.kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or not args.kinds:
        parser.error(f"--kinds: {unknown or 'none given'}; choose among {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    device = resolve_with_defaults(args, DEFAULTS)
    console = Console()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-graphs-") as tmp:
        workdir = Path(tmp)
        console.log(f"digits at {args.input_size} px; dumping the teacher ({args.arch})")
        pool = make_pool(workdir, args, device)
        for kind in args.kinds:
            cfg = configuration(kind, pool, args, workdir / kind)
            console.log(f"{kind}: {args.steps} steps eagerly")
            entry: dict[str, Any] = {"eager": measure(cfg, args)}
            graphed_cfg = dataclasses.replace(cfg, cuda_graphs=True, out_dir=workdir / f"{kind}-g")
            problems = graph_problems(graphed_cfg, device, 1)
            if problems:
                entry["graphed"], entry["not_graphed"] = None, "; ".join(problems)
            else:
                console.log(f"{kind}: {args.steps} steps by CUDA-graph replay")
                entry["graphed"] = measure(graphed_cfg, args)
                entry["speedup"] = round(
                    entry["graphed"]["images_per_s"] / entry["eager"]["images_per_s"], 3
                )
            results[kind] = entry
    result = {
        "benchmark": "training images/s, eager vs CUDA-graph replay, on batches decoded beforehand",
        "machine": machine_name(device),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "settings": {
            "arch": args.arch,
            "input_size": args.input_size,
            "batch": args.batch,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "cached_batches": args.cached,
            "amp": device.type == "cuda",
        },
        "kinds": results,
    }
    out = args.out or RESULTS / f"graphs-{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"train {args.arch} {args.input_size} px, batch {args.batch}, "
                  f"{result['machine']}")  # fmt: skip
    for column in ("kind", "eager img/s", "graphed img/s", "x eager"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, entry in results.items():
        graphed = entry["graphed"]
        table.add_row(
            kind,
            str(entry["eager"]["images_per_s"]),
            "-" if graphed is None else str(graphed["images_per_s"]),
            f"{entry['speedup']:.2f}" if "speedup" in entry else "-",
        )
    console.print(table)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
