"""The cases ``fastkd bench kernels`` times (a kernel, a shape B x C, a teacher kind and, for
``--alone``, a temperature) and the row each method's measurement makes.

A case's inputs are made as training sees them (teachers lean on the label like real models; a
top-k teacher as the store keeps it), and its ideal bytes are what a perfect kernel moves: the
student read, one teacher row read (or its K ids and log-probabilities) and the gradient write.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastkd.compression import TailModel
from fastkd.kernels import PoolTargets

DEFAULT_SHAPES = "256x1000,1024x21841,4096x32000,8192x128256"


@dataclass(frozen=True)
class Case:
    """One timed case: a kernel at B x C with a teacher kind, logits in one dtype."""

    kernel: str  # "partitioned" or "bidirectional"
    rows: int
    classes: int
    teacher: str  # "dense", "topk" (partitioned) or "live" (bidirectional)
    dtype: str
    temperature: float | None = None  # --alone: each case at one T (else --temperature)


@dataclass
class Measurement:
    """One method on one case. ``pct_copy``, ``timing``, ``host_us`` and ``fastkd_speedup``
    (this method's time over fastkd's) are ``--alone``'s (``bench.kernel_alone``)."""

    method: str
    time_ms: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None
    peak_extra_mib: float | None = None
    extra_vs_grad: float | None = None  # peak extra memory / bytes of one B x C gradient
    speedup_vs_eager: float | None = None
    pct_copy: float | None = None  # GB/s of the ideal bytes as a % of a measured copy's GB/s
    timing: str = ""  # how time_ms was measured: CUDA-graph replay, or as called (why)
    host_us: float | None = None  # the Python call's wall time with the device idle
    fastkd_speedup: float | None = None
    note: str = ""


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


def timed(name: str, run: Callable[[], tuple[float, Any]]) -> tuple[float, Any] | Measurement:
    """``run()``'s time and extra, or the ``Measurement`` of ``name`` that says why there is
    none (out of memory, a failure): a comparison method failing must not end the run."""
    try:
        return run()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Measurement(name, note="out of memory")
    except Exception as error:
        return Measurement(name, note=f"failed: {type(error).__name__}: {error}"[:200])
