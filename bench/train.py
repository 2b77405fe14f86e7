"""Training-step cost of knowledge transfer: offline stored targets vs live teachers.

``python -m fastkd.bench.train [--arch resnet18 --image-size 64 --batch 64 ...]``. On the embedded
digits (real images), one run builds a pool of 4 same-architecture teachers (random weights: the
cost of a forward does not depend on them), dumps their outputs with ``fastkd.dump.run_dump``,
then times one training step of the same student on the same batch (the same stored views, so
the same images) for:

- ``ce``: plain cross-entropy (``teachers="none"``), the reference;
- ``offline-k``: the partitioned KD loss on the stored targets of k = 1, 2, 4 teachers; the step
  includes reading those targets from the store (the training loop overlaps that read with the
  previous step in a thread, so this is an upper bound);
- ``live-k``: the same loss with the k teachers run forward on the batch every step.

Within a round every configuration takes one step in turn, so load from other processes hits
them alike; ratios are taken from the fastest of ``--steps`` rounds (the step least disturbed by
other processes, as ``timeit`` does) and the medians are reported beside them. Images are decoded once beforehand:
decoding costs the same in every configuration. The loss runs the fused kernel on a GPU and its
torch reference on CPU. Results (with the ratios to ``ce``) go to ``bench/results/train-<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table

from fastkd.architectures import register as register_architectures
from fastkd.checkpoints import save_checkpoint
from fastkd.digits import write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.runtime import machine_name
from fastkd.training import Batch, StoredTargets, TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"
POOL_SIZES = (1, 2, 4)
OFFLINE_TARGET = 1.15  # offline KD may cost at most this many plain-CE steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_pool(workdir: Path, arch: str, image_size: int, samples: int, views: int) -> dict:
    """Digits, a training subset, a student and 4 teacher checkpoints, and their store."""
    digits = write_digits_folder(workdir / "digits", image_size=image_size)
    per_class = -(-samples // 10)
    lines = [
        f"{label}/{png.name} {label}\n"
        for label in range(10)
        for png in sorted((digits / "train" / str(label)).glob("*.png"))[:per_class]
    ]
    subset = digits / "train" / "bench.txt"
    subset.write_text("".join(lines))
    data_config = {
        "input_size": [3, image_size, image_size],
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "crop_pct": 1.0,
    }
    register_architectures()  # --arch may name fastkd's own (fastkd_mlp_mixer)
    specs = []
    for index in range(1 + max(POOL_SIZES)):
        torch.manual_seed(index)
        model = timm.create_model(arch, num_classes=10)
        name = "student" if index == 0 else f"teacher{index}"
        path = save_checkpoint(
            workdir / f"{name}.pt", model, arch, {"num_classes": 10}, data_config
        )
        specs.append(f"{name}:{arch}={path}")
    store = run_dump(
        DumpConfig(
            data=subset,
            models=specs[1:],
            out=workdir / "store.zarr",
            views=views,
            batch_size=64,
            backend="torch",
            num_workers=0,
            progress=False,
        )
    )
    return {"data": subset, "store": store, "student": specs[0], "teachers": specs[1:]}


def configurations(pool: dict, batch: int, device: str, workdir: Path) -> dict[str, TrainConfig]:
    """One ``TrainConfig`` per measured variant; all read the store's views of the same rows."""
    common = {
        "data": pool["data"],
        "store": pool["store"],
        "student": pool["student"],
        "batch_size": batch,
        "lr": 1e-4,
        "device": device,
        "backend": "torch",
        "num_workers": 0,
        "progress": False,
        "report": False,
        "epochs": 1,
    }
    configs = {"ce": TrainConfig(teachers="none", out_dir=workdir / "ce", **common)}
    names = [spec.split(":", 1)[0] for spec in pool["teachers"]]
    for k in POOL_SIZES:
        configs[f"offline-{k}"] = TrainConfig(
            teachers="offline", members=tuple(names[:k]), out_dir=workdir / f"off{k}", **common
        )
        configs[f"live-{k}"] = TrainConfig(
            teachers="live",
            models=tuple(pool["teachers"][:k]),
            out_dir=workdir / f"live{k}",
            **common,
        )
    return configs


def step_function(trainer: Trainer, batch: Batch) -> Callable[[], None]:
    """One full training step as the loop takes it; offline steps also read their targets."""
    teaching = trainer.teaching
    if not isinstance(teaching, StoredTargets):
        return lambda: trainer.train_step(batch)

    def offline_step() -> None:
        batch.targets = teaching.read(batch.samples, batch.views).to(trainer.device)
        trainer.train_step(batch)

    return offline_step


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="timm name of student and teachers")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256, help="training images in the store")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/")
    args = parser.parse_args(argv)

    console = Console()
    with tempfile.TemporaryDirectory(prefix="fastkd-bench-train-") as tmp:
        workdir = Path(tmp)
        pool = make_pool(workdir, args.arch, args.image_size, args.samples, args.views)
        trainers = {
            name: Trainer(cfg)
            for name, cfg in configurations(pool, args.batch, args.device, workdir).items()
        }
        device = trainers["ce"].device
        # The same rows for every variant: the first batch of epoch 0 of the same store and seed.
        steps = {}
        for name, trainer in trainers.items():
            batches = trainer.batches(trainer.plan(0))
            steps[name] = step_function(trainer, next(batches))
            batches.close()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(args.warmup + args.steps):
            for name, step in steps.items():
                _synchronize(device)
                start = time.perf_counter()
                step()
                _synchronize(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)

    median_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    best_ms = {name: 1e3 * min(t) for name, t in times.items()}
    ratio = {name: ms / best_ms["ce"] for name, ms in best_ms.items()}
    median_ratio = {name: ms / median_ms["ce"] for name, ms in median_ms.items()}
    offline = [ratio[f"offline-{k}"] for k in POOL_SIZES]
    live = [ratio[f"live-{k}"] for k in POOL_SIZES]
    device_name = machine_name(device)
    result = {
        "benchmark": "train step: plain CE vs offline stored targets vs live teachers",
        "machine": device_name,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "loss": "Triton kernel" if device.type == "cuda" else "torch reference (CPU)",
        "arch": args.arch,
        "image_size": args.image_size,
        "batch": args.batch,
        "views": args.views,
        "rounds": args.steps,
        "best_ms": best_ms,
        "ratio_to_ce": ratio,
        "median_ms": median_ms,
        "median_ratio_to_ce": median_ratio,
        "offline_within_target": all(r <= OFFLINE_TARGET for r in offline),
        "offline_target": OFFLINE_TARGET,
        "live_grows_with_teachers": all(a < b for a, b in itertools.pairwise(live)),
        "note": "offline steps include reading their targets from the store synchronously "
        "(the training loop prefetches them in a thread); random weights, real digits images",
    }
    out = args.out or RESULTS / f"train-{'cpu' if device.type == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"{args.arch} {args.image_size}px, batch {args.batch}, {device_name}")
    for column in ("variant", "best ms", "x plain CE", "median ms", "x plain CE (median)"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in sorted(trainers, key=lambda n: (n != "ce", n.split("-")[-1], n)):
        table.add_row(
            name,
            f"{best_ms[name]:.1f}",
            f"{ratio[name]:.3f}",
            f"{median_ms[name]:.1f}",
            f"{median_ratio[name]:.3f}",
        )
    console.print(table)
    console.print(
        f"offline within {OFFLINE_TARGET}x of CE: {result['offline_within_target']}; "
        f"live grows with every teacher: {result['live_grows_with_teachers']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
