"""Store benchmark: bytes per stored view, and random-access read throughput on one core.

The logits are SYNTHETIC (no 1000-class model can be downloaded here), generated to look like a
classifier's: per sample, base logits ~ N(0, 1.5^2) over all classes, the true class raised by
U(4, 12) and four confusable classes by U(2, 8); per view, independent N(0, noise^2) perturbation of
every logit (noise 0.7 by default: crops of one image mostly agree on the top classes). The
dump benchmark's stores hold real models' outputs (random-init timm models on photo-like JPEGs,
1000 classes) and report their bytes per view too.

Run: ``python -m fastkd.bench.store`` (or ``main([...])``); results go to
``bench/results/store-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from fastkd.augment import AugmentConfig
from fastkd.bench.imagenet import IMAGENET_224
from fastkd.compression import DEFAULT_TAIL
from fastkd.runtime import machine_name
from fastkd.storage import Location
from fastkd.store import Manifest, ModelEntry, StoreReader, StoreWriter, summarize
from fastkd.views import epoch_order, epoch_views

RESULTS = Path(__file__).resolve().parent / "results" / "store-cpu.json"
REMOTE_RESULTS = RESULTS.with_name("store-remote-cpu.json")
SYNTHETIC_NOTE = (
    "SYNTHETIC logits: per sample N(0, 1.5^2) base logits, true class +U(4, 12), 4 confusable "
    "classes +U(2, 8); per view N(0, noise^2) on every logit"
)


def synthetic_logits(
    rng: np.random.Generator, labels: np.ndarray, views: int, num_classes: int, noise: float
) -> np.ndarray:
    """[n, views, C] float32 logits of a confident classifier with a few confusable classes."""
    n = labels.shape[0]
    rows = np.arange(n)
    base = rng.normal(0.0, 1.5, size=(n, num_classes)).astype(np.float32)
    base[rows, labels] += rng.uniform(4.0, 12.0, n).astype(np.float32)
    confusable = rng.integers(0, num_classes, size=(n, 4))
    base[rows[:, None], confusable] += rng.uniform(2.0, 8.0, size=(n, 4)).astype(np.float32)
    perturbation = rng.normal(0.0, noise, size=(n, views, num_classes)).astype(np.float32)
    return base[:, None, :] + perturbation


def build_store(
    path: Path | Location,
    samples: int,
    views: int,
    num_classes: int,
    topks: list[int],
    noise: float,
    seed: int,
) -> float:
    """Write a store with one model per top-k (same logits); returns the seconds spent writing."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, samples)
    sizes = np.stack([rng.integers(200, 600, samples), rng.integers(200, 600, samples)], axis=1)
    manifest = Manifest(
        models=[
            ModelEntry(
                f"top{k}" if k else "dense",
                "synthetic",
                None,
                IMAGENET_224,
                num_classes,
                k,
                DEFAULT_TAIL.value if k else None,
            )
            for k in topks
        ],
        num_samples=samples,
        views=views,
        seed=seed,
        augment=asdict(AugmentConfig()),
        fingerprint="synthetic",
        classes=[],
        num_classes=num_classes,
    )
    keys = [f"n{y:05d}/{i:08d}.JPEG" for i, y in enumerate(labels)]
    start = time.perf_counter()
    with StoreWriter.create_or_resume(
        path, manifest, keys, labels, sizes, overwrite=True
    ) as writer:
        for block in writer.pending_blocks():
            lo, hi = writer.block_range(block)
            logits = torch.from_numpy(
                synthetic_logits(rng, labels[lo:hi], views, num_classes, noise)
            )
            writer.write_block(block, {m.name: logits for m in manifest.models})
    return time.perf_counter() - start


def bytes_per_view(path: Path) -> dict:
    """Stored bytes per (sample, view), per model and array, plus the shared arrays."""
    summary = summarize(path)
    rows = summary.manifest.num_samples * summary.manifest.views
    out: dict = {"shared": {}, "models": {}}
    for array in summary.arrays:
        parts = array.path.split("/")
        per_view = round(array.nbytes_stored / rows, 3)
        raw = round(array.nbytes / rows, 3)
        entry = {"stored": per_view, "raw": raw}
        if parts[0] == "models":
            out["models"].setdefault(parts[1], {})[parts[2]] = entry
        else:
            out["shared"][parts[0]] = entry
    for name, arrays in out["models"].items():
        arrays["total"] = {
            "stored": round(summary.bytes_per_view(name), 3),
            "raw": round(sum(a["raw"] for a in arrays.values()), 3),
        }
    out["shared"]["total"] = {"stored": round(summary.bytes_per_view(None), 3)}
    out["files"] = summary.num_files
    out["compression_ratio"] = round(summary.compression_ratio, 3)
    return out


def read_throughput(path: Path, model: str, batch: int, seed: int, warm_epochs: int = 3) -> dict:
    """Views/s of random (sample, view) batches as training reads them: shuffled epochs.

    cold: a fresh reader's first epoch, which decodes every block on first touch (the store's
    files are in the OS page cache, just written); warm: the next ``warm_epochs`` epochs, all
    blocks cached; warm_any_view: uniformly random (sample, view) rows from the warm cache.
    """
    reader = StoreReader(path)
    n = reader.num_samples

    def epochs(first: int, count: int) -> dict:
        plans = []
        for epoch in range(first, first + count):
            order = epoch_order(seed, epoch, n)
            plans.append((order, epoch_views(seed, epoch, order, reader.num_views)))
        start = time.perf_counter()
        for order, views in plans:
            for lo in range(0, n, batch):
                reader.read(model, order[lo : lo + batch], views[lo : lo + batch])
        seconds = time.perf_counter() - start
        return {"views_per_s": round(count * n / seconds), "seconds": round(seconds, 3)}

    out = {"cold": epochs(0, 1), "warm": epochs(1, warm_epochs)}
    rng = np.random.default_rng(seed)
    rows = 1000 * batch
    samples, views = rng.integers(0, n, rows), rng.integers(0, reader.num_views, rows)
    start = time.perf_counter()
    for lo in range(0, rows, batch):
        reader.read(model, samples[lo : lo + batch], views[lo : lo + batch])
    out["warm_any_view"] = {"views_per_s": round(rows / (time.perf_counter() - start))}
    out["blocks_decoded"] = reader.blocks_decoded
    return out


def pin_one_core() -> str:
    """Run on one core (and tell torch so), so the read figures are per core."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.7, help="per-view logit perturbation std")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build the store (local disk)"
    )
    parser.add_argument(
        "--remote",
        default=None,
        help="the remote case instead: 'moto' (moto's S3 server on 127.0.0.1) or an s3:// "
        "prefix on a real server; cold-epoch reads at 1, 8 and 32 concurrent block reads "
        "against local disk (fastkd.bench.store_remote)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.remote:
        return _main_remote(args)
    args.out = args.out or RESULTS

    pinning = pin_one_core()
    workdir = Path(tempfile.mkdtemp(prefix="fastkd-bench-store-", dir=args.dir))
    try:
        path = workdir / "store"
        write_s = build_store(
            path, args.samples, args.views, args.classes, [5, 10], args.noise, args.seed
        )
        sizes = bytes_per_view(path)
        reads = {
            name: read_throughput(path, name, args.batch, args.seed) for name in ("top5", "top10")
        }
        # How much the sizes depend on the synthetic model: views that disagree twice as much.
        noisier = workdir / "noisier"
        build_store(
            noisier, min(args.samples, 4096), args.views, args.classes, [5, 10], 2 * args.noise,
            args.seed,
        )  # fmt: skip
        sizes_noisier = {n: a["total"] for n, a in bytes_per_view(noisier)["models"].items()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "machine": machine_name("cpu"),  # the store is read on the CPU
        "platform": platform.platform(),
        "cpu_pinning": pinning,
        "data": SYNTHETIC_NOTE + f" (noise={args.noise})",
        "samples": args.samples,
        "views": args.views,
        "classes": args.classes,
        "write_seconds": round(write_s, 2),
        "bytes_per_view": sizes,
        "bytes_per_view_noise_x2": sizes_noisier,
        "targets": {
            "top10_max_bytes_per_view": 48,
            "top5_max_bytes_per_view": 24,
            "reads_min_views_per_s": 100_000,
        },
        "read_note": (
            "one core; cold = a fresh reader's first shuffled epoch, decoding every shard once "
            "(files in the OS page cache, just written); warm = later epochs from the block cache"
        ),
        "read_batch": args.batch,
        "reads": reads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, arrays in sizes["models"].items():
        detail = ", ".join(f"{a} {v['stored']}" for a, v in arrays.items() if a != "total")
        print(
            f"{name}: {arrays['total']['stored']} B/view stored ({arrays['total']['raw']} raw): {detail}"
        )
    print(f"per-view noise x2: {sizes_noisier}")
    for name, r in reads.items():
        print(
            f"{name} reads (batch {args.batch}, one core): cold epoch {r['cold']['views_per_s']:,} views/s, "
            f"warm epoch {r['warm']['views_per_s']:,}, warm any view {r['warm_any_view']['views_per_s']:,}"
        )
    print(f"({SYNTHETIC_NOTE}) -> {args.out}")


def _main_remote(args: argparse.Namespace) -> None:
    from fastkd.bench.store_remote import remote_reads

    samples = min(args.samples, 32768)  # a minute of writing through a local server
    if samples < args.samples:
        print(f"the remote case writes at most 32,768 samples: {samples} of --samples {args.samples}")
    reads = remote_reads(
        args.remote, samples, args.views, args.classes, args.noise, args.batch, args.seed
    )
    result = {
        "machine": machine_name("cpu"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "data": SYNTHETIC_NOTE + f" (noise={args.noise})",
        "samples": samples,
        "views": args.views,
        "classes": args.classes,
        "read_batch": args.batch,
        "read_note": (
            "cold shuffled epoch of a fresh reader (every block fetched and decoded once), "
            "median of 3; views/s = (sample, view) rows read per second; concurrency = block "
            "reads in flight (--storage-option concurrency=N); the server shares the machine"
        ),
        "target": ">= 20,000 views/s at 32 concurrent requests, or the server's ceiling",
        **reads,
    }
    out = args.out or REMOTE_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    local = reads["local_disk"]["views_per_s"]
    print(f"local disk: {local} views/s (cold epoch)")
    for concurrency, figure in reads["remote_by_concurrency"].items():
        print(
            f"{reads['server']}, {concurrency} in flight: {figure['views_per_s']} views/s "
            f"({figure['ratio_to_local_disk']:.2f} x local disk)"
        )


if __name__ == "__main__":
    main()

