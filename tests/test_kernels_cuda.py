"""The fused KD kernels compiled for a GPU, on CUDA tensors, against their torch references.

What the CPU suite (``test_kernels_partitioned.py``, ``test_kernels_bidirectional.py``) checks
under the Triton interpreter, here on real hardware and at every benchmark shape
(``fastkd.bench.kernels.DEFAULT_SHAPES``). Skipped without CUDA, and when ``TRITON_INTERPRET=1``
(``conftest.py`` turns the interpreter on for CPU runs; on a GPU it would run the kernels in the
interpreter): ``scripts/gpu-check`` runs this file with ``TRITON_INTERPRET=0``.
``FASTKD_TEST_DEVICE=cpu`` (with ``TRITON_INTERPRET=1``) runs the cases on CPU under the
interpreter, with 4 rows: a debug aid for this file, not a GPU check.

The matrix. Partitioned: every benchmark shape x teacher (dense fp16 / bf16 / fp32, top-k 10 /
100 with int32 / int64 ids) x mode (live / fixed / best). Bidirectional: every shape x N (2, 3,
4) x stop_grad. The other options (temperature 1 / 2 / 4, the kernels' three compiled
temperature paths; the logits' dtype; the memory layout; ``inplace_grad``; the reduction, with
``scale`` and ``grad_output_is_one``; the pool's size) are chosen per case so that every pair of
values of any two options occurs in some case (``all_pairs``): every option is met on hardware
while the number of compiled kernel variants, the time this file takes, stays near one per
case. Every case has ignored rows (``ignore_index``).

Layouts, so that the vector-width rule (``kernels.common.vector_width`` / ``aligned_width``) is
exercised where a wrong promise is a misaligned access: ``contiguous``; ``padded`` (rows C + 8
apart: for odd C every row starts at another 16-byte phase, and a dense teacher is laid out with
its rows in the student's phase, so the kernel promises vector loads on it as well);
``odd-stride`` (rows C + 3 apart); ``unaligned`` (``logits[:, 1:]`` of a [B, C + 1] buffer: no
vector loads). Top-k log-probabilities, ids and draws take the same layout along K.

References: each kernel's torch reference in fp64, computed in chunks of rows (B x C fp64 of the
largest shape is 8 GiB), each row's loss weighted by what the reduction, ``scale`` and
``grad_output`` make of it. The comparisons are ``torch.testing.assert_close``'s rule with the
CPU tests' tolerances, the gradient's atol relative to the largest reference gradient.

Rows: the matrix cuts the largest shape (8192 x 128256) to 1024 rows, keeping C;
``test_full_size_*`` run the benchmark's own configurations at all 8192 rows (the dense teacher
then has 2.1e9 elements: int64 offsets) and are meant to run alone (``-k full_size``, without
pytest-xdist), as ``scripts/gpu-check`` does. ``test_memcheck_*`` are the small cases that
``scripts/gpu-check`` also runs under compute-sanitizer (odd C, many tiles, every layout).
"""

from __future__ import annotations

import functools
import itertools
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch
from test_kernels_bidirectional import GRAD_TOL as BIDIRECTIONAL_GRAD_TOL
from test_kernels_bidirectional import assert_matches_reference as assert_bidirectional_matches
from test_kernels_bidirectional import make_logits
from test_kernels_partitioned import GRAD_TOL, IGNORE, make_case
from test_kernels_partitioned import assert_matches_reference as assert_partitioned_matches
from torch import Tensor

from fastkd.bench.kernels import DEFAULT_SHAPES, parse_shapes
from fastkd.kernels import (
    TARGET_FIELDS,
    BidirectionalKDConfig,
    KDStats,
    PartitionedKDConfig,
    PoolTargets,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
    partitioned_kd_loss,
    partitioned_kd_reference,
)
from fastkd.partition import NO_TEACHER

DEVICE = torch.device(os.environ.get("FASTKD_TEST_DEVICE", "cuda"))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _skip_reason() -> str | None:
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            return "needs CUDA: run scripts/gpu-check on a machine with a GPU"
        if INTERPRETED:
            return (
                "TRITON_INTERPRET=1 would run the kernels in the interpreter: run with "
                "TRITON_INTERPRET=0 (scripts/gpu-check does)"
            )
        return None
    return (
        None if INTERPRETED else "a CPU debug run (FASTKD_TEST_DEVICE=cpu) needs TRITON_INTERPRET=1"
    )


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

# Tolerances of the CPU tests' assert_matches_reference (the gradient's: GRAD_TOL, by dtype).
LOSS_TOL = (2e-5, 2e-5)
PARTITIONED_STAT_TOL = {"kl": (1e-4, 2e-5), "p_student": (1e-5, 1e-7), "p_teacher": (1e-5, 1e-7)}
BIDIRECTIONAL_STAT_TOL = dict.fromkeys(("kl", "p_student", "p_teacher"), (1e-4, 2e-5))

BENCH_SHAPES = tuple(tuple(shape) for shape in parse_shapes(DEFAULT_SHAPES))
MATRIX_ELEMENTS = 2**27  # rows x classes in the matrix: the largest shape is cut to 1024 rows
CHUNK_ELEMENTS = 2**24  # rows x classes per reference chunk: 128 MiB a fp64 tensor

TEACHERS = (
    "dense-float16",
    "dense-bfloat16",
    "dense-float32",
    "top10-int32",
    "top10-int64",
    "top100-int32",
    "top100-int64",
)
MODES = ("live", "fixed", "best")
TEMPERATURES = (1.0, 2.0, 4.0)
DTYPES = ("bfloat16", "float32", "float16")
LAYOUTS = ("contiguous", "padded", "odd-stride", "unaligned")
# mean; sum with grad_output -1.5; mean with scale 0.25 and grad_output_is_one; the training
# step's sum x 1 / rows with grad_output_is_one; none with a per-row grad_output.
REDUCTIONS = ("mean", "sum-x1.5", "mean-one", "sum-one", "none")
MIXED_DTYPES = ("float32", "bfloat16", "float16")  # the bidirectional "mixed" dtype, cycled


def matrix_rows(rows: int, classes: int) -> int:
    if DEVICE.type == "cpu":  # the interpreter: a debug run
        return min(rows, 4)
    while rows * classes > MATRIX_ELEMENTS:
        rows //= 2
    return rows


# ----------------------------------------------------------------------------------------------
# The case matrix


def all_pairs(base: dict[str, Sequence], extra: dict[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the ``base`` options, each completed option by option with the value
    that covers the most pairs not yet covered (ties: the value used least so far, then the
    first); then, while a pair of values of two options occurs in no case, a case made for it,
    completed the same way. Deterministic, so every pytest-xdist worker collects the same."""
    domains = {**base, **extra}
    names = list(domains)
    uncovered = {
        ((a, x), (b, y))
        for a, b in itertools.combinations(names, 2)
        for x in domains[a]
        for y in domains[b]
    }

    def new_pairs(case: dict[str, Any], name: str, value: Any) -> int:
        return sum(
            (((other, case[other]), (name, value)) if names.index(other) < names.index(name)
             else ((name, value), (other, case[other]))) in uncovered
            for other in case
        )  # fmt: skip

    used = {name: dict.fromkeys(domains[name], 0) for name in names}

    def complete(case: dict[str, Any]) -> dict[str, Any]:
        for name in names:
            if name not in case:
                case[name] = max(
                    domains[name], key=lambda v, n=name: (new_pairs(case, n, v), -used[n][v])
                )
            used[name][case[name]] += 1
        uncovered.difference_update(
            ((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)
        )
        return {name: case[name] for name in names}

    cases = [complete(dict(zip(base, v, strict=True))) for v in itertools.product(*base.values())]
    while uncovered:
        (a, x), (b, y) = min(uncovered, key=repr)
        cases.append(complete({a: x, b: y}))
    return cases


@dataclass(frozen=True)
class PartitionedCase:
    rows: int
    classes: int
    teacher: str  # dense-<dtype> or top<K>-<id dtype>
    mode: str
    temperature: float
    dtype: str  # the student's logits
    layout: str
    inplace: bool
    reduction: str
    members: int
    self_index: int | None = None  # the student's pool column (fixed mode: 1 when None)
    max_block: int | None = None

    @property
    def id(self) -> str:
        return "-".join(
            [
                f"{self.rows}x{self.classes}",
                self.teacher.replace("bfloat", "bf").replace("float", "fp"),
                self.mode,
                f"T{self.temperature:g}",
                self.dtype.replace("bfloat", "bf").replace("float", "fp"),
                self.layout,
                *(["inplace"] if self.inplace else []),
                self.reduction,
                f"M{self.members}",
                *([f"blk{self.max_block}"] if self.max_block else []),
            ]
        )


@dataclass(frozen=True)
class BidirectionalCase:
    rows: int
    classes: int
    models: int
    stop_grad: bool
    temperature: float
    dtype: str  # every model's, or "mixed" (MIXED_DTYPES cycled)
    layout: str  # every model's, or "mixed" (LAYOUTS cycled)
    inplace: bool
    reduction: str
    max_block: int | None = None

    @property
    def id(self) -> str:
        return "-".join(
            [
                f"{self.rows}x{self.classes}",
                f"N{self.models}",
                "stop_grad" if self.stop_grad else "teacher_grad",
                f"T{self.temperature:g}",
                self.dtype.replace("bfloat", "bf").replace("float", "fp"),
                self.layout,
                *(["inplace"] if self.inplace else []),
                self.reduction,
                *([f"blk{self.max_block}"] if self.max_block else []),
            ]
        )


@functools.cache
def partitioned_matrix() -> tuple[PartitionedCase, ...]:
    cases = all_pairs(
        {"shape": BENCH_SHAPES, "teacher": TEACHERS, "mode": MODES},
        {
            "temperature": TEMPERATURES,
            "dtype": DTYPES,
            "layout": LAYOUTS,
            "inplace": (False, True),
            "reduction": REDUCTIONS,
            "members": (2, 3),
        },
    )
    out = []
    for case in cases:
        rows, classes = case.pop("shape")
        out.append(PartitionedCase(matrix_rows(rows, classes), classes, **case))
    return tuple(out)


@functools.cache
def bidirectional_matrix() -> tuple[BidirectionalCase, ...]:
    cases = all_pairs(
        {"shape": BENCH_SHAPES, "models": (2, 3, 4), "stop_grad": (True, False)},
        {
            "temperature": TEMPERATURES,
            "dtype": ("bfloat16", "float32", "mixed"),
            "layout": (*LAYOUTS, "mixed"),
            "inplace": (False, True),
            "reduction": REDUCTIONS,
        },
    )
    out = []
    for case in cases:
        rows, classes = case.pop("shape")
        out.append(BidirectionalCase(matrix_rows(rows, classes), classes, **case))
    return tuple(out)


# The small cases run under compute-sanitizer: odd C, a C smaller than a 16-byte head's reach,
# tiles forced narrow (many whole tiles between a head and a tail), every layout, ignored rows.
MEMCHECK_PARTITIONED = (
    PartitionedCase(7, 1001, "dense-bfloat16", "live", 1.0, "bfloat16", "unaligned", True, "mean", 3, max_block=256),
    PartitionedCase(7, 1001, "top10-int32", "best", 2.0, "float32", "odd-stride", False, "none", 2, max_block=256),
    PartitionedCase(7, 1001, "top10-uniform-int64", "live", 2.0, "bfloat16", "contiguous", False, "mean", 2),
    PartitionedCase(7, 4099, "top10-sampled-int32", "best", 1.0, "float32", "padded", False, "sum-one", 2),
    PartitionedCase(7, 4099, "dense-float32", "fixed", 4.0, "bfloat16", "padded", False, "sum-one", 2),
    PartitionedCase(7, 4099, "top100-int64", "live", 2.0, "float16", "unaligned", True, "mean-one", 3, max_block=512),
    PartitionedCase(7, 37, "dense-float16", "best", 4.0, "float32", "odd-stride", False, "none", 2),
    PartitionedCase(7, 37, "top10-int32", "fixed", 1.0, "bfloat16", "padded", False, "sum-x1.5", 2, max_block=16),
    PartitionedCase(7, 21841, "dense-bfloat16", "best", 2.0, "bfloat16", "padded", False, "mean", 2),
)  # fmt: skip
MEMCHECK_BIDIRECTIONAL = (
    BidirectionalCase(7, 1001, 2, True, 1.0, "bfloat16", "unaligned", True, "mean", max_block=256),
    BidirectionalCase(7, 1001, 3, False, 2.0, "mixed", "mixed", False, "none", max_block=128),
    BidirectionalCase(7, 4099, 4, True, 4.0, "float32", "padded", False, "sum-one"),
    BidirectionalCase(7, 37, 4, False, 2.0, "mixed", "odd-stride", False, "mean-one", max_block=16),
    BidirectionalCase(7, 4099, 3, True, 1.0, "bfloat16", "contiguous", True, "mean"),
    BidirectionalCase(7, 37, 2, False, 4.0, "float16", "mixed", False, "sum-x1.5"),
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Inputs


def seed_of(case: PartitionedCase | BidirectionalCase) -> int:
    return zlib.crc32(case.id.encode())


def ignore_rows(labels: Tensor) -> Tensor:
    """Rows 1, 6, 11, ... are ignored (about a fifth of them)."""
    labels[1::5] = IGNORE
    return labels


def laid_out(values: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
    """A copy of ``values`` [..., C] in ``dtype`` with ``layout`` (the module docstring)."""
    if layout == "contiguous":
        return values.to(dtype, copy=True).contiguous()
    pad, start = {"padded": (8, 0), "odd-stride": (3, 0), "unaligned": (1, 1)}[layout]
    classes = values.shape[-1]
    buffer = torch.zeros(*values.shape[:-1], classes + pad, dtype=dtype, device=values.device)
    view = buffer[..., start : start + classes]
    view.copy_(values)
    return view


def phased_teacher(values: Tensor, dtype: torch.dtype, student_row_stride: int) -> Tensor:
    """A copy of dense teacher logits [B, M, C] whose members start 16 bytes apart's multiples
    and whose rows keep the student's row phase modulo 8 elements: the layout on which the
    kernel promises vector loads of the teacher (``common.aligned_width``)."""
    rows, members, classes = values.shape
    member_stride = -(-classes // 8) * 8
    row_stride = members * member_stride + (student_row_stride - members * member_stride) % 8
    buffer = torch.zeros(rows * row_stride, dtype=dtype, device=values.device)
    teacher = buffer.as_strided((rows, members, classes), (row_stride, member_stride, 1))
    teacher.copy_(values)
    return teacher


def leaf(values: Tensor, layout: str, dtype: torch.dtype) -> Tensor:
    """A leaf requiring grad with ``layout`` (a view of a buffer that does not require grad)."""
    return laid_out(values, layout, dtype).requires_grad_()


@dataclass
class Reduction:
    """What a REDUCTIONS name means: the loss options and the upstream gradient."""

    options: dict[str, Any]
    grad_output: Tensor | None


def reduction_of(name: str, labels: Tensor, generator: torch.Generator) -> Reduction:
    rows = labels.shape[0]
    if name == "mean":
        return Reduction({"reduction": "mean"}, None)
    if name == "sum-x1.5":
        return Reduction({"reduction": "sum"}, torch.tensor(-1.5, device=labels.device))
    if name == "mean-one":
        return Reduction({"reduction": "mean", "scale": 0.25, "grad_output_is_one": True}, None)
    if name == "sum-one":  # as Trainer.train_step calls the losses
        options = {"reduction": "sum", "scale": 1.0 / rows, "grad_output_is_one": True}
        return Reduction(options, None)
    grad_output = torch.randn(rows, device=labels.device, generator=generator)
    grad_output[::3] = 0.0
    return Reduction({"reduction": "none"}, grad_output)


def row_weights(reduction: Reduction, labels: Tensor) -> Tensor:
    """d(what backward starts from) / d(row loss), fp64 [B]: the reduction, scale, grad_output."""
    options = reduction.options
    scale = options.get("scale", 1.0)
    rows = labels.shape[0]
    if options["reduction"] == "none":
        return reduction.grad_output.double() * scale
    upstream = 1.0 if reduction.grad_output is None else reduction.grad_output.double()
    weight = torch.full((rows,), scale, dtype=torch.float64, device=labels.device) * upstream
    if options["reduction"] == "mean":
        weight = weight / (labels != IGNORE).sum().clamp_min(1).double()
    return weight


def partitioned_inputs(case: PartitionedCase) -> dict[str, Any]:
    """Student logits (a leaf with the case's layout), labels and pool targets, as make_case
    draws them (members and the student lean on the label by different amounts)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed_of(case))
    rows, classes, members = case.rows, case.classes, case.members
    index = torch.arange(rows, device=DEVICE)
    labels = torch.randint(0, classes, (rows,), device=DEVICE, generator=gen)
    student = torch.randn(rows, classes, device=DEVICE, generator=gen) * 2
    student[index, labels] += torch.rand(rows, device=DEVICE, generator=gen) * 8
    student = leaf(student, case.layout, getattr(torch, case.dtype))
    pool = torch.randn(rows, members, classes, device=DEVICE, generator=gen) * 3
    pool[index, :, labels] += torch.rand(rows, members, device=DEVICE, generator=gen) * 8
    ignore_rows(labels)
    kind, *tail, dtype = case.teacher.split("-")  # dense-<dtype>, top<K>[-<tail>]-<id dtype>
    if kind == "dense":
        targets = PoolTargets.from_logits(pool, labels)
        logprobs = pool.float().log_softmax(-1).to(getattr(torch, dtype))
        if case.layout == "padded":
            targets.logprobs = phased_teacher(logprobs, logprobs.dtype, student.stride(0))
        else:
            targets.logprobs = laid_out(logprobs, case.layout, logprobs.dtype)
    else:
        tail = tail[0] if tail else "bucket"
        draws = 6 if tail == "sampled" else 0
        targets = PoolTargets.from_logits(pool, labels, int(kind.removeprefix("top")), tail, draws)
        targets.topk_logprobs = laid_out(targets.topk_logprobs, case.layout, torch.float16)
        targets.topk_ids = laid_out(targets.topk_ids, case.layout, getattr(torch, dtype))
        if targets.tail_ids is not None:
            targets.tail_ids = laid_out(targets.tail_ids, case.layout, getattr(torch, dtype))
    del pool
    options = {
        "mode": case.mode,
        "self_index": 1 if case.mode == "fixed" and case.self_index is None else case.self_index,
        "temperature": case.temperature,
        "inplace_grad": case.inplace,
        "max_block": case.max_block,
    }
    return {
        "student": student,
        "labels": labels,
        "targets": targets,
        "options": options,
        "gen": gen,
    }


def bidirectional_inputs(case: BidirectionalCase) -> dict[str, Any]:
    """Every model's logits (leaves with the case's layouts and dtypes), leaning on the label by
    random amounts as make_logits draws them, and the labels."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed_of(case))
    rows, classes = case.rows, case.classes
    index = torch.arange(rows, device=DEVICE)
    labels = torch.randint(0, classes, (rows,), device=DEVICE, generator=gen)
    logits = []
    for m in range(case.models):
        z = torch.randn(rows, classes, device=DEVICE, generator=gen) * 2
        z[index, labels] += torch.rand(rows, device=DEVICE, generator=gen) * 6
        dtype = MIXED_DTYPES[m % 3] if case.dtype == "mixed" else case.dtype
        layout = LAYOUTS[m % len(LAYOUTS)] if case.layout == "mixed" else case.layout
        logits.append(leaf(z, layout, getattr(torch, dtype)))
    ignore_rows(labels)
    options = {
        "stop_grad": case.stop_grad,
        "temperature": case.temperature,
        "inplace_grad": case.inplace,
        "max_block": case.max_block,
    }
    return {"logits": logits, "labels": labels, "options": options, "gen": gen}


def target_rows(targets: PoolTargets, rows: slice) -> PoolTargets:
    """The targets of a run of rows (every tensor field sliced; the tail model kept)."""
    return PoolTargets(
        **{
            name: None if getattr(targets, name) is None else getattr(targets, name)[rows]
            for name in TARGET_FIELDS
        },
        tail=targets.tail,
    )


# ----------------------------------------------------------------------------------------------
# The comparison


@dataclass
class KernelResult:
    loss: Tensor
    grads: list[Tensor]
    stats: KDStats


ReferenceRows = Callable[[slice], tuple[Tensor, list[Tensor], KDStats]]


def chunks(rows: int, classes: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // classes)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def assert_matches_chunked_reference(
    kernel: KernelResult,
    reference_rows: ReferenceRows,
    labels: Tensor,
    reduction: Reduction,
    grad_tol: dict[torch.dtype, tuple[float, float]],
    stat_tol: dict[str, tuple[float, float]],
) -> None:
    """The kernel's loss, gradients and stats against the fp64 reference, chunk by chunk of rows
    (``reference_rows(rows)``: row losses with reduction none, the fp64 leaves, the stats)."""
    rows = labels.shape[0]
    classes = kernel.grads[0].shape[1]
    weights = row_weights(reduction, labels)
    excess = [torch.zeros((), dtype=torch.float64, device=labels.device) for _ in kernel.grads]
    largest = [torch.zeros((), dtype=torch.float64, device=labels.device) for _ in kernel.grads]
    row_losses = []
    for part in chunks(rows, classes):
        row_loss, leaves, stats = reference_rows(part)
        row_loss.backward(weights[part])
        row_losses.append(row_loss.detach())
        for m, (grad, ref) in enumerate(zip(kernel.grads, leaves, strict=True)):
            rtol, _ = grad_tol[grad.dtype]
            ref_grad = ref.grad
            difference = (grad[part].double() - ref_grad).abs() - rtol * ref_grad.abs()
            excess[m] = torch.maximum(excess[m], difference.max())
            largest[m] = torch.maximum(largest[m], ref_grad.abs().max())
        chosen = kernel.stats.chosen[part]
        if not torch.equal(chosen, stats.chosen):
            wrong = (chosen != stats.chosen).nonzero().flatten()[:8] + part.start
            raise AssertionError(
                f"chosen differs on rows {wrong.tolist()}: kernel "
                f"{kernel.stats.chosen[wrong].tolist()}, reference {stats.chosen[wrong - part.start].tolist()}"
            )
        for name, (rtol, atol) in stat_tol.items():
            torch.testing.assert_close(
                getattr(kernel.stats, name)[part].double(),
                getattr(stats, name).double(),
                rtol=rtol,
                atol=atol,
                msg=lambda text, name=name, part=part: f"stats.{name}, rows {part}: {text}",
            )
    row_loss = torch.cat(row_losses)
    options = reduction.options
    expected = row_loss * options.get("scale", 1.0)
    if options["reduction"] != "none":
        expected = expected.sum()
        if options["reduction"] == "mean":
            expected = expected / (labels != IGNORE).sum().clamp_min(1)
    torch.testing.assert_close(kernel.loss.double(), expected, rtol=LOSS_TOL[0], atol=LOSS_TOL[1])
    for m, grad in enumerate(kernel.grads):
        _, atol = grad_tol[grad.dtype]
        bound = atol * largest[m].item()
        assert excess[m].item() <= bound, (
            f"gradient of model {m} ({grad.dtype}): |kernel - reference| exceeds "
            f"rtol * |reference| by {excess[m].item():.3g} > atol {bound:.3g}"
        )


def check_partitioned(case: PartitionedCase) -> tuple[KDStats, Tensor]:
    """Run the kernel on the case and compare it with the reference; its stats and labels."""
    inputs = partitioned_inputs(case)
    student, labels, targets = inputs["student"], inputs["labels"], inputs["targets"]
    reduction = reduction_of(case.reduction, labels, inputs["gen"])
    options = {**inputs["options"], **reduction.options}
    original = student.detach().clone()  # the gradient may overwrite the logits (inplace_grad)
    loss, stats = partitioned_kd_loss(student, labels, targets, **options)
    loss.backward(reduction.grad_output)
    grad = student.grad
    assert grad is not None and grad.dtype == student.dtype and grad.shape == student.shape
    if case.inplace:
        assert torch.equal(student.detach(), grad), "inplace_grad: the logits hold the gradient"
    reference = PartitionedKDConfig(
        **{k: v for k, v in inputs["options"].items() if k != "inplace_grad"}, reduction="none"
    )

    def reference_rows(rows: slice) -> tuple[Tensor, list[Tensor], KDStats]:
        z = original[rows].double().requires_grad_()
        row_loss, ref_stats = partitioned_kd_reference(
            z, labels[rows], target_rows(targets, rows), reference
        )
        return row_loss, [z], ref_stats

    result = KernelResult(loss.detach(), [grad], stats)
    assert_matches_chunked_reference(
        result, reference_rows, labels, reduction, GRAD_TOL, PARTITIONED_STAT_TOL
    )
    return stats, labels


def check_bidirectional(case: BidirectionalCase) -> tuple[KDStats, Tensor]:
    """Run the kernel on the case and compare it with the reference; its stats and labels."""
    inputs = bidirectional_inputs(case)
    logits, labels = inputs["logits"], inputs["labels"]
    reduction = reduction_of(case.reduction, labels, inputs["gen"])
    options = {**inputs["options"], **reduction.options}
    originals = [z.detach().clone() for z in logits]
    loss, stats = bidirectional_kd_loss(logits, labels, **options)
    loss.backward(reduction.grad_output)
    grads = [z.grad for z in logits]
    for z, grad in zip(logits, grads, strict=True):
        assert grad is not None and grad.dtype == z.dtype and grad.shape == z.shape
        if case.inplace:
            assert torch.equal(z.detach(), grad), "inplace_grad: the logits hold the gradient"
    reference = BidirectionalKDConfig(
        stop_grad=case.stop_grad, temperature=case.temperature, reduction="none"
    )

    def reference_rows(rows: slice) -> tuple[Tensor, list[Tensor], KDStats]:
        leaves = [z[rows].double().requires_grad_() for z in originals]
        row_loss, ref_stats = bidirectional_kd_reference(leaves, labels[rows], reference)
        return row_loss, leaves, ref_stats

    result = KernelResult(loss.detach(), grads, stats)
    assert_matches_chunked_reference(
        result, reference_rows, labels, reduction, BIDIRECTIONAL_GRAD_TOL, BIDIRECTIONAL_STAT_TOL
    )
    return stats, labels


@pytest.fixture(autouse=True)
def _release_memory():
    """Give cached blocks back after each test: pytest-xdist workers share the GPU's memory."""
    yield
    if DEVICE.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _ids(cases: Sequence[PartitionedCase | BidirectionalCase]) -> list[str]:
    return [case.id for case in cases]


# ----------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("case", partitioned_matrix(), ids=_ids(partitioned_matrix()))
def test_partitioned_at_benchmark_shapes(case: PartitionedCase):
    stats, labels = check_partitioned(case)
    taught = stats.chosen[labels != IGNORE] != NO_TEACHER
    assert taught.any() or len(taught) < 32, "no row was taught: the case checked CE only"


@pytest.mark.parametrize("case", bidirectional_matrix(), ids=_ids(bidirectional_matrix()))
def test_bidirectional_at_benchmark_shapes(case: BidirectionalCase):
    stats, labels = check_bidirectional(case)
    taught = stats.chosen[labels != IGNORE] != NO_TEACHER
    assert taught.any() or len(taught) < 32, "no row was taught: the case checked CE only"


@pytest.mark.parametrize("case", MEMCHECK_PARTITIONED, ids=_ids(MEMCHECK_PARTITIONED))
def test_memcheck_partitioned(case: PartitionedCase):
    check_partitioned(case)


@pytest.mark.parametrize("case", MEMCHECK_BIDIRECTIONAL, ids=_ids(MEMCHECK_BIDIRECTIONAL))
def test_memcheck_bidirectional(case: BidirectionalCase):
    check_bidirectional(case)


def test_memcheck_all_rows_ignored_give_zero_loss_and_gradients():
    student, _, targets = make_case(5, 1001, topk=10, dtype=torch.bfloat16)
    logits, _ = make_logits(3, 5, 1001, (torch.bfloat16, torch.float32))
    labels = torch.full((5,), IGNORE, device=DEVICE)
    leaves = [student.to(DEVICE).requires_grad_()]
    loss, stats = partitioned_kd_loss(leaves[0], labels, targets.to(DEVICE), mode="best")
    loss.backward()
    bidirectional = [z.to(DEVICE).requires_grad_() for z in logits]
    loss_b, stats_b = bidirectional_kd_loss(bidirectional, labels, reduction="sum")
    loss_b.backward()
    assert loss.item() == 0.0 and loss_b.item() == 0.0
    for z in (*leaves, *bidirectional):
        assert torch.count_nonzero(z.grad) == 0
    assert (stats.chosen == NO_TEACHER).all() and (stats_b.chosen == NO_TEACHER).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_memcheck_grad_scale_rounds_the_fp32_product_once(dtype):
    """The backward's scale pass (kernels.grad_scale) is the fp32 product rounded once (rtne) to
    the gradient's dtype, scalar and per-row factors, an odd row length. (torch's own mul_ with
    a 0-dim fp32 factor rounds the factor to a bf16 / fp16 gradient's dtype first: the H200 run
    of 2026-11-26 saw the two differ, docs/gpu-results.md.)"""
    from fastkd.choices import Reduction
    from fastkd.kernels.common import scale_grad_

    if DEVICE.type == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter casts fp32 -> bf16 by truncation (test_kernels_scale.py)")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    wide = torch.randn(33, 21845, generator=gen, device=DEVICE).to(dtype)
    grad = wide[:, :21841].contiguous()  # 33 x 21841: whole blocks and a masked remainder
    scalar = torch.tensor(0.3217, device=DEVICE)
    per_row = torch.randn(33, 2, generator=gen, device=DEVICE)[:, 1]
    expected = (grad.float() * scalar).to(dtype)
    assert torch.equal(scale_grad_(grad.clone(), scalar, Reduction.SUM), expected)
    strided = wide.clone()[:, :21841]  # rows with a stride: the row kernel
    assert torch.equal(scale_grad_(strided, scalar, Reduction.SUM), expected)
    expected = (grad.float() * per_row.unsqueeze(1)).to(dtype)
    assert torch.equal(scale_grad_(grad.clone(), per_row, Reduction.NONE), expected)


# The CPU suite's own cases (its helpers, its tolerances), on the device.


def _cpu_case_on_device(topk: int, dtype: torch.dtype, mode: str, **options) -> None:
    """The CPU suite's case (6 rows, 1000 classes; member 1 is the student in ``fixed``) held to
    its reference on the device."""
    student, labels, targets = make_case(6, 1000, topk=topk, dtype=dtype)
    assert_partitioned_matches(
        student.to(DEVICE),
        labels.to(DEVICE),
        targets.to(DEVICE),
        mode=mode,
        self_index=1 if mode == "fixed" else None,
        max_block=256,
        **options,
    )


@pytest.mark.parametrize("mode", ["live", "fixed", "best"])
@pytest.mark.parametrize("topk", [0, 7], ids=["dense", "top7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_suite_partitioned_modes_and_dtypes(mode, topk, dtype):
    _cpu_case_on_device(topk, dtype, mode, temperature=2.5)


@pytest.mark.parametrize(
    ("mode", "score"),
    [("plain", "label"), ("live", "confidence"), ("fixed", "confidence"), ("best", "confidence")],
)
@pytest.mark.parametrize("topk", [0, 7], ids=["dense", "top7"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cpu_suite_plain_kd_and_the_confidence_score(mode, score, topk, temperature):
    _cpu_case_on_device(topk, torch.bfloat16, mode, partition_score=score, temperature=temperature)


@pytest.mark.parametrize(
    ("rows", "classes", "max_block"),
    [(5, 10, None), (4, 1001, None), (4, 1001, 64), (2, 32003, None)],
    ids=["C10", "C1001-one-tile", "C1001-16-tiles", "C32003-two-tiles"],
)
@pytest.mark.parametrize("topk", [0, 5], ids=["dense", "top5"])
def test_cpu_suite_partitioned_class_counts(rows, classes, max_block, topk):
    student, labels, targets = make_case(rows, classes, topk=topk, seed=classes)
    assert_partitioned_matches(
        student.to(DEVICE),
        labels.to(DEVICE),
        targets.to(DEVICE),
        mode="best",
        kd_weight=0.7,
        ce_weight=0.3,
        max_block=max_block,
    )


@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "reference_code"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_suite_bidirectional_two_models(dtype, stop_grad):
    logits, labels = make_logits(2, 6, 1000, (dtype,))
    assert_bidirectional_matches(
        [z.to(DEVICE) for z in logits],
        labels.to(DEVICE),
        temperature=2.0,
        stop_grad=stop_grad,
        max_block=256,
    )


@pytest.mark.parametrize("models", [3, 4])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "reference_code"])
def test_cpu_suite_bidirectional_n_models_mixed_dtypes(models, stop_grad):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    logits, labels = make_logits(models, 5, 301, dtypes, seed=models)
    assert_bidirectional_matches(
        [z.to(DEVICE) for z in logits],
        labels.to(DEVICE),
        temperature=1.5,
        stop_grad=stop_grad,
        kd_weight=0.5,
        max_block=64,
    )


# The benchmark's own configurations (fastkd.bench.kernels defaults: bf16 logits, T = 2, live
# mode with the student as pool column 0 of 2, top-100 fp16 logits with int32 ids) at the
# largest benchmark shape, all rows. Run alone: -k full_size.

FULL_ROWS, FULL_CLASSES = BENCH_SHAPES[-1]


@pytest.mark.parametrize("teacher", ["dense-bfloat16", "top100-int32"])
def test_full_size_partitioned(teacher):
    if DEVICE.type != "cuda":
        pytest.skip("the full-size cases run on CUDA only")
    case = PartitionedCase(
        FULL_ROWS, FULL_CLASSES, teacher, "live", 2.0, "bfloat16", "contiguous", False, "mean", 2,
        self_index=0,
    )  # fmt: skip
    check_partitioned(case)


def test_full_size_bidirectional():
    if DEVICE.type != "cuda":
        pytest.skip("the full-size cases run on CUDA only")
    case = BidirectionalCase(
        FULL_ROWS, FULL_CLASSES, 2, True, 2.0, "bfloat16", "contiguous", False, "mean"
    )
    check_bidirectional(case)


def describe_matrix() -> dict[str, Any]:
    """The matrix as plain data (``python tests/test_kernels_cuda.py`` prints it)."""
    return {
        "partitioned": [asdict(c) for c in partitioned_matrix()],
        "bidirectional": [asdict(c) for c in bidirectional_matrix()],
    }


if __name__ == "__main__":  # a look at the matrix without running it
    import json

    print(json.dumps(describe_matrix(), indent=1))
