"""Benchmark of the fused KD kernels: forward + backward time, bandwidth, peak memory.

``python -m fastkd.bench.kernels [--shapes 256x1000,...] [--out PATH]``. For each shape B x C and
teacher kind (dense, top-k) it times, in one run: fastkd's kernel (Triton on a GPU, the torch
reference on CPU unless TRITON_INTERPRET=1), the torch reference in eager mode, torch.compile of
the reference, and Liger-Kernel's KL path (log_softmax + LigerKLDIVLoss, dense teachers, KL only)
when liger-kernel is importable. GB/s counts ideal bytes: the student read, the teacher read (one
pool member's row, or its K ids and log-probabilities) and the gradient write. Peak memory is
what a step allocates beyond its inputs. Results go to JSON with the device name (the error of
sparse targets against the dense teacher is ``fastkd bench targets``).

With liger-kernel installed (and CUDA) two more rows per case are *bandwidth peers*, not the same
loss: Liger's fused cross-entropy (``liger_ce_peer``: CE alone on the student's logits, its
gradient written over them in the forward; it reads B x C and writes B x C) and its fused JSD
(``liger_jsd_peer``: generalised JSD, beta 0.5, student vs a dense teacher, on log-probabilities
made before the timed step; it reads 2 B x C and writes B x C). They are the closest fused
kernels: one vocabulary-wide pass, the gradient written in the forward. Their GB/s counts their
own ideal bytes, and they get no speed-up vs eager (other math).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fastkd.compression import TailModel
from fastkd.kernels import (
    TARGET_FIELDS,
    BidirectionalKDConfig,
    PartitionedKDConfig,
    PoolTargets,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
    partitioned_kd_loss,
    partitioned_kd_reference,
)
from fastkd.runtime import machine_name, resolve_device

DEFAULT_SHAPES = "256x1000,1024x21841,4096x32000,8192x128256"
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


# Methods that compute other losses than fastkd's (bandwidth peers): their own bytes, no speed-up.
PEERS = ("liger_ce_peer", "liger_jsd_peer")
PEER_NOTES = {
    "liger_ce_peer": "other loss (CE only): bandwidth peer; GB/s of its own B x C read + write",
    "liger_jsd_peer": "other loss (JSD on log-probs): bandwidth peer; GB/s of its 2 reads + write",
}


@dataclass(frozen=True)
class Case:
    kernel: str  # "partitioned" or "bidirectional"
    rows: int
    classes: int
    teacher: str  # "dense", "topk" (partitioned) or "live" (bidirectional)
    dtype: str


@dataclass
class Measurement:
    method: str
    time_ms: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None
    peak_extra_mib: float | None = None
    extra_vs_grad: float | None = None  # peak extra memory / bytes of one B x C gradient
    speedup_vs_eager: float | None = None
    note: str = ""


def peak_bandwidth(device_name: str) -> float | None:
    for pattern, bandwidth in PEAK_BANDWIDTH:
        if re.search(pattern, device_name):
            return bandwidth
    return None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(n) for n in item.lower().split("x", 1)) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes: expected BxC[,BxC...], got {text!r}") from None


def make_inputs(case: Case, args: argparse.Namespace, device: torch.device) -> dict:
    """Student logits (leaf), labels and targets; teachers lean on the label like real models."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    rows, classes = case.rows, case.classes
    labels = torch.randint(0, classes, (rows,), device=device, generator=gen)
    row_index = torch.arange(rows, device=device)

    def logits(*shape: int) -> torch.Tensor:
        z = torch.randn(*shape, classes, device=device, generator=gen, dtype=dtype)
        z[row_index, ..., labels] += 4.0
        return z

    if case.kernel == "bidirectional":
        return {"logits": [logits(rows) for _ in range(2)], "labels": labels}
    pool = logits(rows, args.members)
    if case.teacher == "topk":
        targets = PoolTargets.from_logits(pool, labels, args.topk, TailModel.BUCKET)
        targets.topk_ids = targets.topk_ids.int()  # as the store keeps them (fp16 values already)
    else:
        targets = PoolTargets.from_logits(pool, labels, 0)
    del pool
    return {"student": logits(rows), "labels": labels, "targets": targets}


def ideal_bytes(case: Case, inputs: dict) -> int:
    """Bytes a perfect kernel moves: logits read, one teacher row read, gradient written."""
    if case.kernel == "bidirectional":
        return sum(2 * z.numel() * z.element_size() for z in inputs["logits"])
    student, targets = inputs["student"], inputs["targets"]
    logits_bytes = student.numel() * student.element_size()
    if targets.is_sparse:
        per_row = targets.topk * (
            targets.topk_logprobs.element_size() + targets.topk_ids.element_size()
        )
        teacher_bytes = case.rows * per_row
    else:
        teacher_bytes = case.rows * case.classes * targets.logprobs.element_size()
    return 2 * logits_bytes + teacher_bytes


def methods(case: Case, inputs: dict, args: argparse.Namespace) -> dict[str, Callable | str]:
    """Name -> a forward + backward step, or the reason the method is unavailable."""
    temperature = args.temperature
    labels = inputs["labels"]
    if case.kernel == "bidirectional":
        leaves = [z.requires_grad_() for z in inputs["logits"]]
        config = BidirectionalKDConfig(temperature=temperature)

        def fastkd() -> None:
            bidirectional_kd_loss(leaves, labels, temperature=temperature)[0].backward()

        def reference(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return bidirectional_kd_reference([za, zb], y, config)[0]

        tensors = (*leaves, labels)
        liger = "dense partitioned teachers only"
    else:
        student, targets = inputs["student"].requires_grad_(), inputs["targets"]
        options = {"mode": "live", "temperature": temperature, "self_index": 0}
        config = PartitionedKDConfig(**options)
        leaves = [student]

        def fastkd() -> None:
            partitioned_kd_loss(student, labels, targets, **options)[0].backward()

        def reference(z: torch.Tensor, y: torch.Tensor, *target_tensors) -> torch.Tensor:
            fields = dict(zip(TARGET_FIELDS, target_tensors, strict=True))
            pool = PoolTargets(**fields, tail=targets.tail)
            return partitioned_kd_reference(z, y, pool, config)[0]

        tensors = (student, labels, *(getattr(targets, name) for name in TARGET_FIELDS))
        liger = liger_step(student, targets, temperature) if not targets.is_sparse else ""
        if not liger:
            liger = "dense teachers only"

    def eager() -> None:
        reference(*tensors).backward()

    found: dict[str, Callable | str] = {"fastkd": fastkd, "torch_eager": eager}
    if args.no_compile:
        found["torch_compile"] = "disabled (--no-compile)"
    else:
        compiled = torch.compile(reference)
        found["torch_compile"] = lambda: compiled(*tensors).backward()
    found["liger_kl"] = liger
    found.update(liger_peers(case, inputs))
    for name, step in list(found.items()):
        if callable(step):
            found[name] = _clearing_grads(step, leaves)
    return found


def liger_step(student: torch.Tensor, targets: PoolTargets, temperature: float) -> Callable | str:
    """Liger's KL path on the best teacher's dense log-probabilities, or why it is unavailable."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return "liger-kernel not installed"
    if not student.is_cuda:
        return "needs CUDA"
    teacher = targets.logprobs[:, 1]
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def step() -> None:
        log_q = torch.log_softmax(student.float() / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
        (kl(log_q, log_p) * temperature**2).backward()

    return step


def liger_peers(case: Case, inputs: dict) -> dict[str, Callable | str]:
    """Liger's fused cross-entropy and JSD on this case's logits (module docstring: bandwidth
    peers, other losses), each a forward + backward step on its own leaf, or why unavailable.

    The CE kernel writes its gradient over its input, so it gets a copy of the student's logits;
    the JSD takes log-probabilities, made once here (outside the timed step) from the student
    and from a dense teacher: pool member 1 (the live-mode student is member 0), or model 1."""
    student = inputs["logits"][0] if case.kernel == "bidirectional" else inputs["student"]
    if not student.is_cuda:
        return dict.fromkeys(PEERS, "needs CUDA")
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.jsd import LigerJSD
    except Exception as error:  # not installed, or an import that fails on this machine
        return dict.fromkeys(PEERS, f"liger-kernel not importable: {type(error).__name__}")
    labels = inputs["labels"]
    logits = student.detach().clone().requires_grad_()
    cross_entropy = LigerCrossEntropyLoss()

    def ce_step() -> None:
        _loss_of(cross_entropy(logits, labels)).backward()
        logits.grad = None

    peers: dict[str, Callable | str] = {"liger_ce_peer": ce_step}
    if case.kernel == "bidirectional":
        teacher = inputs["logits"][1]
    elif inputs["targets"].logprobs is not None:
        teacher = inputs["targets"].logprobs[:, 1]
    else:
        peers["liger_jsd_peer"] = "dense teachers only"
        return peers
    with torch.no_grad():
        log_q = torch.log_softmax(student.float(), dim=-1).to(student.dtype)
        log_p = torch.log_softmax(teacher.float(), dim=-1).to(student.dtype)
    log_q.requires_grad_()
    jsd = LigerJSD(beta=0.5)

    def jsd_step() -> None:
        _loss_of(jsd(log_q, log_p)).backward()
        log_q.grad = None

    peers["liger_jsd_peer"] = jsd_step
    return peers


def peer_bytes(method: str, case: Case) -> int:
    """Ideal bytes of a bandwidth peer: its B x C reads and its gradient write."""
    element = torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
    passes = {"liger_ce_peer": 2, "liger_jsd_peer": 3}[method]
    return passes * case.rows * case.classes * element


def _loss_of(output: object) -> torch.Tensor:
    """The loss tensor of a Liger module's output (a tensor, a tuple, or an object with .loss,
    depending on the version)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.loss


def _clearing_grads(step: Callable, leaves: list[torch.Tensor]) -> Callable:
    def run() -> None:
        step()
        for leaf in leaves:
            leaf.grad = None

    return run


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
        try:
            ms, extra = measure(step, device, args.reps)
        except torch.OutOfMemoryError:
            results.append(Measurement(name, note="out of memory"))
            torch.cuda.empty_cache()
            continue
        except Exception as error:  # a comparison method failing must not end the run
            results.append(Measurement(name, note=f"failed: {type(error).__name__}: {error}"[:200]))
            continue
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
        "--shapes", default=DEFAULT_SHAPES, help="B x C list, e.g. 256x1000,4096x32000"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--teachers", default="dense,topk", help="dense, topk (partitioned)")
    parser.add_argument("--kernels", default="partitioned,bidirectional")
    parser.add_argument("--topk", type=int, default=100, help="K of the top-k teacher")
    parser.add_argument("--members", type=int, default=2, help="pool members (the student is 0)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    device = resolve_device(args.device)
    name = machine_name(device)
    peak = peak_bandwidth(name) if device.type == "cuda" else None
    cases = [
        Case(kernel, rows, classes, teacher, args.dtype)
        for kernel in args.kernels.split(",")
        for rows, classes in parse_shapes(args.shapes)
        for teacher in (args.teachers.split(",") if kernel == "partitioned" else ["live"])
    ]
    console = Console(width=160)
    table = Table(title=f"KD kernels, forward + backward, {args.dtype}, {name}")
    for column in (
        "kernel",
        "BxC",
        "teacher",
        "method",
        "ms",
        "GB/s",
        "% peak",
        "extra MiB",
        "x eager",
        "note",
    ):
        table.add_column(column)
    report = []
    for case in cases:
        entry = run_case(case, args, device, peak)
        report.append(entry)
        for m in entry["results"]:
            table.add_row(
                case.kernel,
                f"{case.rows}x{case.classes}",
                case.teacher,
                m["method"],
                *(
                    _fmt(m[key])
                    for key in ("time_ms", "gbps", "pct_peak", "peak_extra_mib", "speedup_vs_eager")
                ),
                m["note"],
            )
    console.print(table)

    out = (
        args.out
        or RESULTS / f"kernels-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json"
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
