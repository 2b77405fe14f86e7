"""Benchmark of the fused KD kernels: forward + backward time, bandwidth, peak memory.

``python -m fastkd.bench.kernels [--alone] [--shapes 256x1000,...] [--out PATH]``. For each
shape B x C and teacher kind (dense, top-k) it times, in one run: fastkd's kernel (Triton on a
GPU, the torch reference on CPU unless TRITON_INTERPRET=1), the torch reference in eager mode,
torch.compile of the reference, and Liger-Kernel's KL path (log_softmax + LigerKLDIVLoss, dense
teachers, KL only) when liger-kernel is importable. GB/s counts ideal bytes: the student read,
the teacher read (one pool member's row, or its K ids and log-probabilities) and the gradient
write. Peak memory is what a step allocates beyond its inputs. Results go to JSON with the device
name (the error of sparse targets against the dense teacher is ``fastkd bench targets``).

With liger-kernel installed (and CUDA) two more rows per case are *bandwidth peers*, not the same
loss: Liger's fused cross-entropy (``liger_ce_peer``: CE alone on the student's logits, its
gradient written over them in the forward; it reads B x C and writes B x C) and its fused JSD
(``liger_jsd_peer``: generalised JSD, beta 0.5, student vs a dense teacher, on log-probabilities
made before the timed step; it reads 2 B x C and writes B x C). They are the closest fused
kernels: one vocabulary-wide pass, the gradient written in the forward. Their GB/s counts their
own ideal bytes, and they get no speed-up vs eager (other math).

``--alone`` measures instead the training call alone on the device by CUDA-graph replay, as a
percentage of a measured copy of its ideal bytes, at T = 1 and 2, with the host microseconds per
call (``bench.kernel_alone``; JSON ``kernels-alone-<device>.json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fastkd.bench.kernel_alone import ALONE_SHAPES, ALONE_TOPK, alone_cases, run_alone_case
from fastkd.bench.kernel_cases import (
    DEFAULT_SHAPES,
    Case,
    Measurement,
    ideal_bytes,
    make_inputs,
    parse_shapes,
    timed,
)
from fastkd.bench.kernel_methods import PEER_NOTES, PEERS, methods, peer_bytes
from fastkd.runtime import machine_name, resolve_device

RESULTS = Path(__file__).resolve().parent / "results"

# Peak memory bandwidth in bytes/s by device name, most specific pattern first.
PEAK_BANDWIDTH = [
    (r"H100.*PCIe", 2.0e12),
    (r"H100.*NVL", 3.9e12),
    (r"H100", 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    (r"GH200", 4.0e12),
    (r"H200", 4.8e12),
    (r"B200", 8.0e12),
    (r"A100.*PCIE.*40GB|A100-PCIE-40GB", 1.555e12),
    (r"A100.*80GB PCIe", 1.935e12),
    (r"A100.*SXM4-40GB", 1.555e12),
    (r"A100", 2.039e12),
    (r"L40S|L40", 0.864e12),
    (r"A10G|A10\b", 0.6e12),
    (r"RTX 4090", 1.008e12),
]


def peak_bandwidth(device_name: str) -> float | None:
    for pattern, bandwidth in PEAK_BANDWIDTH:
        if re.search(pattern, device_name):
            return bandwidth
    return None


def measure(step: Callable, device: torch.device, reps: int) -> tuple[float, float | None]:
    """Median milliseconds of ``step`` and, on CUDA, its peak memory beyond what exists before."""
    if device.type == "cuda":
        import triton.testing

        step()  # compile / autotune outside the measured region
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        ms = triton.testing.do_bench(step, warmup=10, rep=max(reps, 20), return_mode="median")
        return ms, peak
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), None


def run_case(case: Case, args: argparse.Namespace, device: torch.device, peak: float | None):
    inputs = make_inputs(case, args, device)
    nbytes = ideal_bytes(case, inputs)
    grad_bytes = (
        case.rows * case.classes * torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
    )
    results: list[Measurement] = []
    for name, step in methods(case, inputs, args).items():
        if isinstance(step, str):
            results.append(Measurement(name, note=step))
            continue
        outcome = timed(name, lambda step=step: measure(step, device, args.reps))
        if isinstance(outcome, Measurement):
            results.append(outcome)
            continue
        ms, extra = outcome
        peer = name in PEERS
        gbps = (peer_bytes(name, case) if peer else nbytes) / ms / 1e6
        results.append(
            Measurement(
                name,
                time_ms=ms,
                gbps=gbps,
                pct_peak=None if peak is None else 100 * gbps * 1e9 / peak,
                peak_extra_mib=None if extra is None else extra / 2**20,
                extra_vs_grad=None if extra is None else extra / grad_bytes,
                note=PEER_NOTES[name] if peer else "",
            )
        )
    eager = next(m.time_ms for m in results if m.method == "torch_eager")
    for m in results:
        if m.time_ms is not None and eager is not None and m.method not in PEERS:
            m.speedup_vs_eager = eager / m.time_ms
    del inputs
    return {"case": asdict(case), "ideal_bytes": nbytes, "results": [asdict(m) for m in results]}


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fastkd.bench.kernels", description=__doc__
    )
    parser.add_argument(
        "--alone",
        action="store_true",
        help="the training call alone by CUDA-graph replay vs a copy of its ideal bytes, at each "
        "--temperatures, with host us per call (bench.kernel_alone); partitioned kernel only",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"B x C list (default {DEFAULT_SHAPES}; --alone: {ALONE_SHAPES})",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--teachers", default="dense,topk", help="dense, topk (partitioned)")
    parser.add_argument("--kernels", default="partitioned,bidirectional")
    parser.add_argument(
        "--topk", type=int, default=None, help=f"K of a top-k teacher (100; --alone: {ALONE_TOPK})"
    )
    parser.add_argument("--members", type=int, default=2, help="pool members (the student is 0)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--temperatures", default="1,2", help="--alone: the T of each case")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (CPU; --alone)")
    parser.add_argument(
        "--graph-calls", type=int, default=20, help="--alone: calls captured in one CUDA graph"
    )
    parser.add_argument(
        "--host-calls", type=int, default=100, help="--alone: calls timed for host us"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = ALONE_SHAPES if args.alone else DEFAULT_SHAPES
    if args.topk is None:
        args.topk = ALONE_TOPK if args.alone else 100
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    device = resolve_device(args.device)
    name = machine_name(device)
    peak = peak_bandwidth(name) if device.type == "cuda" else None
    shapes = parse_shapes(args.shapes)
    if args.alone:
        cases = alone_cases(args, shapes)
        title = f"KD training call alone (forward + backward), {args.dtype}, {name}"
        columns = ("ms", "GB/s", "% copy", "% peak", "host us", "fastkd x", "timing / note")
        keys = ("time_ms", "gbps", "pct_copy", "pct_peak", "host_us", "fastkd_speedup")
    else:
        cases = [
            Case(kernel, rows, classes, teacher, args.dtype)
            for kernel in args.kernels.split(",")
            for rows, classes in shapes
            for teacher in (args.teachers.split(",") if kernel == "partitioned" else ["live"])
        ]
        title = f"KD kernels, forward + backward, {args.dtype}, {name}"
        columns = ("ms", "GB/s", "% peak", "extra MiB", "x eager", "note")
        keys = ("time_ms", "gbps", "pct_peak", "peak_extra_mib", "speedup_vs_eager")
    console = Console(width=160)
    table = Table(title=title)
    for column in ("kernel", "BxC", "teacher", "T", "method", *columns):
        table.add_column(column)
    report = []
    for case in cases:
        entry = (run_alone_case if args.alone else run_case)(case, args, device, peak)
        report.append(entry)
        for m in entry["results"]:
            table.add_row(
                case.kernel,
                f"{case.rows}x{case.classes}",
                case.teacher,
                _fmt(args.temperature if case.temperature is None else case.temperature),
                m["method"],
                *(_fmt(m[key]) for key in keys),
                " ".join(filter(None, (m["timing"] if args.alone else "", m["note"]))),
            )
    console.print(table)

    stem = "kernels-alone" if args.alone else "kernels"
    out = (
        args.out
        or RESULTS / f"{stem}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": name,
                "peak_bandwidth_bytes_per_s": peak,
                "torch": torch.__version__,
                "triton": _version("triton"),
                "liger_kernel": _version("liger_kernel"),
                "args": {k: str(v) for k, v in vars(args).items()},
                "cases": report,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _version(module: str) -> str | None:
    try:  # the distribution's metadata: liger_kernel has no __version__
        return importlib.metadata.version(module.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
