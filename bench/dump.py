"""Dump benchmark: a pool's whole dump against its ceiling, the pool's pure forward, per backend.

On one folder of photo-like JPEGs (``fastkd.bench.photos``: ImageNet's sizes and file sizes) and
the same stored views, one run measures three figures in steady state (the first
``--warmup-batches`` batches of each left out; start-up on its own line):

- ceiling: the pool's forward alone, on batches already on the device (the same images, in the
  layout and autocast the dump uses): what the dump would reach if loading and writing were free;
  timed first and last, and their mean taken (a shared machine changes pace);
- loader: ``view_loader`` alone (read, check, hash, decode, crop, resize per data config, flip,
  normalise, to the device), per backend;
- dump: the whole ``fastkd dump`` (loader + every model + encoding, hashing and zarr writes),
  per backend, with block writes overlapped with inference (``--write-queues``' first depth) and
  for comparison as the other depths given (0: written synchronously, as before they were
  overlapped).

The headline is dump / ceiling per backend. The backends are those present: DALI when installed,
torch (PIL decoding on the CPU in DataLoader workers), and nvjpeg (torchvision's GPU decoder) on a
GPU. The pool is random-init timm models (``fastkd.bench.pool``: speed does not depend on the
weights) unless ``--pool`` names checkpoints. A view is one decoded image; images/s counts views.

The photos carry ImageNet's 1000 classes (``--classes``), so the heads, the stored top-k and
tail and their encoding run at the size users run. Run: ``fastkd bench dump`` (``--help`` for
the options); results go to ``bench/results/dump-cpu.json`` (``dump-gpu.json`` on a GPU;
``scripts/gpu-check`` names the device).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fastkd.augment import AugmentConfig
from fastkd.bench.device_defaults import resolve_with_defaults, synchronize
from fastkd.bench.photos import describe, label_list, write_photos
from fastkd.bench.pool import CPU_INPUT_SIZE, model_specs, parse_pool
from fastkd.data import ImageDataset, ViewBatch, open_dataset, resolve_backend, view_loader
from fastkd.dump import DumpConfig, member_logits, prepare_pool, run_dump
from fastkd.errors import ConfigError
from fastkd.models import LoadedModel, ModelSpec, load_model
from fastkd.runtime import (
    autocast,
    fast_memory_format,
    machine_name,
)
from fastkd.store import summarize
from fastkd.views import all_views

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {  # (GPU, CPU): the CPU's end in a few minutes on 2 cores
    "images": (1024, 384),
    "views": (8, 4),
    "batch_size": (256, 64),
}


def present_backends(device: torch.device) -> list[str]:
    """The backends this machine has: DALI when installed, torch, nvjpeg on a GPU whose
    torchvision decodes JPEGs there."""
    backends = ["dali"] if importlib.util.find_spec("nvidia.dali") is not None else []
    backends.append("torch")
    if device.type == "cuda":
        try:
            backends.append(resolve_backend("nvjpeg", device))
        except ConfigError as why:
            print(f"no nvjpeg backend here: {why}")
    return backends


def _loader(
    dataset: ImageDataset, items: dict, configs: list[dict], backend: str, args, device
) -> Any:
    return view_loader(
        dataset,
        items["samples"],
        items["views"],
        items["boxes"],
        items["flips"],
        configs,
        batch_size=args.batch_size,
        backend=backend,
        num_workers=args.workers,
        device=device,
    )


def steady_rate(stamps: Sequence[tuple[float, int]], warmup: int, end: float) -> dict[str, float]:
    """Images/s from the end of batch ``warmup`` to ``end``, from (time, images) per batch; the
    start-up is the time to the first batch (``stamps`` count from the start, time 0)."""
    if len(stamps) <= warmup:
        raise ConfigError(
            f"only {len(stamps)} batches: need more than --warmup-batches {warmup} "
            "(give more --images or a smaller --batch-size)"
        )
    start = stamps[warmup - 1][0] if warmup else 0.0
    images = sum(count for _, count in stamps[warmup:])
    return {
        "startup_s": round(stamps[0][0], 3),
        "timed_batches": len(stamps) - warmup,
        "timed_s": round(end - start, 3),
        "images_per_s": round(images / (end - start), 1),
    }


def ceiling_rate(
    pool: list[LoadedModel], batches: list[ViewBatch], timed: int, warmup: int, amp: bool, device
) -> dict[str, float]:
    """The pool's forward alone on ``batches`` (on the device), cycled for ``warmup + timed``
    batches, as the dump runs it (``member_logits`` of a pool made ready by ``prepare_pool``:
    classifier in fp32, fast layout; inference mode, bf16 autocast on a GPU)."""
    count = 0
    with torch.inference_mode(), autocast(device, amp):
        for step in range(warmup + timed):
            if step == warmup:
                synchronize(device)
                start = time.perf_counter()
            for member, image in zip(pool, batches[step % len(batches)].images, strict=True):
                member_logits(member, image, device)
            count += len(batches[step % len(batches)].samples) if step >= warmup else 0
        synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "timed_batches": timed,
        "timed_s": round(seconds, 3),
        "images_per_s": round(count / seconds, 1),
    }


def park(pool: list[LoadedModel], batches: list[ViewBatch], device: torch.device) -> None:
    """Move the ceiling's pool (already made ready: ``prepare_pool``) and batches to
    ``device``, in its fast layout there."""
    for member in pool:
        member.model.to(device, memory_format=fast_memory_format(device))
    for batch in batches:
        batch.images = [image.to(device) for image in batch.images]


def loader_rate(dataset, items, configs, backend, args, device) -> dict[str, float]:
    """``view_loader`` alone over every item, steady state (``steady_rate``)."""
    stamps, start = [], time.perf_counter()
    for batch in _loader(dataset, items, configs, backend, args, device):
        if len(stamps) + 1 == args.warmup_batches:
            synchronize(device)
        stamps.append((time.perf_counter() - start, len(batch.samples)))
    synchronize(device)
    return steady_rate(stamps, args.warmup_batches, time.perf_counter() - start)


def dump_rate(cfg: DumpConfig, warmup: int, device: torch.device) -> dict[str, float]:
    """The whole dump, steady state: from the end of batch ``warmup`` (the device synchronised
    there) to ``run_dump``'s return (every block written); start-up: models, checksums, store,
    workers and the first batch."""
    stamps: list[tuple[float, int]] = []
    start = time.perf_counter()

    def on_batch(images: int) -> None:
        if len(stamps) + 1 == warmup:
            synchronize(device)
        stamps.append((time.perf_counter() - start, images))

    run_dump(cfg, on_batch=on_batch)
    return steady_rate(stamps, warmup, time.perf_counter() - start)


def parse_args(argv: list[str] | None, prog: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pool",
        default=None,
        help="comma-separated timm names (random init) or NAME=CKPT; default on a GPU: "
        "resnet50,convnext_tiny,vit_small_patch16_224; on CPU: test_resnet,test_convnext,test_vit",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help=f"px (default: timm's; {CPU_INPUT_SIZE} on CPU)",
    )
    parser.add_argument("--images", type=int, default=None, help="photos (default 1024; CPU 384)")
    parser.add_argument("--classes", type=int, default=1000, help="the data set's (ImageNet's)")
    parser.add_argument("--views", type=int, default=None, help="views a photo (default 8; CPU 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256; CPU 64")
    parser.add_argument(
        "--workers", type=int, default=None, help="DALI threads / DataLoader processes "
        "(default: the loader's, sized to the machine)"
    )  # fmt: skip
    parser.add_argument("--warmup-batches", type=int, default=3, help="left out of every rate")
    parser.add_argument(
        "--block-samples", type=int, default=None, help="samples a store block (default: a "
        "power of two giving at least 8 blocks, so writes overlap inference as in a long dump)"
    )  # fmt: skip
    parser.add_argument(
        "--backends", default=None, help="comma-separated: dali, torch, nvjpeg (default: present)"
    )
    parser.add_argument(
        "--write-queues", default="2,0", help="dump block-write queue depths to run (0: sync)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    device = resolve_with_defaults(args, DEFAULTS)
    on_gpu = device.type == "cuda"
    if args.block_samples is None:  # at least 8 blocks
        args.block_samples = 1 << max(0, (args.images // 8).bit_length() - 1)
    entries = parse_pool(args.pool, on_gpu)
    input_size = args.input_size or (None if on_gpu or args.pool else CPU_INPUT_SIZE)
    backends = args.backends.split(",") if args.backends else present_backends(device)
    queues = [int(q) for q in args.write_queues.split(",")]
    machine = machine_name(device)
    out = args.out or RESULTS / f"dump-{'gpu' if on_gpu else 'cpu'}.json"
    console = Console()

    with tempfile.TemporaryDirectory(prefix="fastkd-bench-dump-") as tmp:
        tmp = Path(tmp)
        console.log(f"writing {args.images} photo-like JPEGs")
        data = label_list(write_photos(tmp / "photos", args.images), args.classes)
        dataset = open_dataset(data)
        specs = model_specs(entries, tmp, dataset.num_classes, input_size)
        pool = [load_model(ModelSpec.parse(spec)) for spec in specs]
        configs = [member.data_config for member in pool]
        items = all_views(0, np.arange(len(dataset)), args.views, dataset.sizes, AugmentConfig())
        result: dict[str, Any] = {
            "benchmark": "dump: pool forward (ceiling) vs loader vs whole dump, steady state",
            "machine": machine,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "settings": {
                "pool": entries,
                "input_sizes": [m.data_config["input_size"][1:] for m in pool],
                "classes": dataset.num_classes,
                "views": args.views,
                "batch_size": args.batch_size,
                "workers": args.workers or "loader default",
                "warmup_batches": args.warmup_batches,
                "block_samples": args.block_samples,
                "device": str(device),
                "amp": on_gpu,
                "weights": "given checkpoints" if all("=" in e for e in entries) else "random init",
            },
            "photos": describe(tmp / "photos"),
            "views": len(items["samples"]),
        }
        console.log("ceiling: the pool's forward on batches already on the device")
        batches = _loader(dataset, items, configs, "torch", args, device)
        cached = list(itertools.islice(batches, 2))
        batches.close()  # its workers stopped: they must not decode ahead during the ceiling
        gc.collect()
        timed = max(20, -(-len(items["samples"]) // args.batch_size) - args.warmup_batches)
        prepare_pool(pool, device, on_gpu)
        ceilings = [ceiling_rate(pool, cached, timed, args.warmup_batches, on_gpu, device)]
        park(pool, cached, torch.device("cpu"))  # off the GPU while each dump loads its own
        result["backends"] = {}
        for backend in backends:
            console.log(f"{backend}: the loader alone, then the whole dump")
            entry: dict[str, Any] = {
                "loader": loader_rate(dataset, items, configs, backend, args, device)
            }
            for queue in queues:
                cfg = DumpConfig(
                    data=data,
                    models=specs,
                    out=tmp / f"store-{backend}-{queue}",
                    views=args.views,
                    batch_size=args.batch_size,
                    backend=backend,
                    num_workers=args.workers,
                    device=str(device),
                    write_queue=queue,
                    samples_per_shard=args.block_samples,
                    progress=False,
                )
                entry[f"dump_write_queue_{queue}"] = dump_rate(cfg, args.warmup_batches, device)
            result["backends"][backend] = entry
        console.log("the ceiling again: the machine may have changed pace meanwhile")
        park(pool, cached, device)
        ceilings.append(ceiling_rate(pool, cached, timed, args.warmup_batches, on_gpu, device))
        del cached
        ceiling = round(statistics.mean(c["images_per_s"] for c in ceilings), 1)
        result["ceiling"] = {"images_per_s": ceiling, "first_and_last": ceilings}
        for entry in result["backends"].values():
            entry["loader_vs_ceiling"] = round(entry["loader"]["images_per_s"] / ceiling, 3)
            for queue in queues:
                rate = entry[f"dump_write_queue_{queue}"]["images_per_s"]
                entry[f"dump_write_queue_{queue}_vs_ceiling"] = round(rate / ceiling, 3)
        summary = summarize(tmp / f"store-{backends[0]}-{queues[0]}")
        result["bytes_per_view"] = {
            e.name: round(summary.bytes_per_view(e.name), 2) for e in summary.manifest.models
        }
        result["headline"] = {
            backend: result["backends"][backend][f"dump_write_queue_{queues[0]}_vs_ceiling"]
            for backend in backends
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, result, queues)
    console.print(f"wrote {out}")


def print_table(console: Console, result: dict, queues: list[int]) -> None:
    ceiling = result["ceiling"]["images_per_s"]
    table = Table(title=f"dump, {result['machine']}: ceiling (pool forward) {ceiling} images/s")
    for column in ("backend", "loader img/s", "x ceiling", *[f"dump q{q} img/s" for q in queues],
                   *[f"q{q} x ceiling" for q in queues], "dump start-up s"):  # fmt: skip
        table.add_column(column, justify="left" if column == "backend" else "right")
    for backend, entry in result["backends"].items():
        dumps = [entry[f"dump_write_queue_{q}"] for q in queues]
        table.add_row(
            backend,
            f"{entry['loader']['images_per_s']}",
            f"{entry['loader_vs_ceiling']:.2f}",
            *[f"{d['images_per_s']}" for d in dumps],
            *[f"{entry[f'dump_write_queue_{q}_vs_ceiling']:.2f}" for q in queues],
            f"{dumps[0]['startup_s']}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
