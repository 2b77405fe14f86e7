"""The configurations ``fastkd bench compile`` covers, and the one launch each one makes.

A ``Config`` is a kernel at a shape with its options; ``capture`` runs its launcher on CPU
tensors of that shape (uninitialised: no page of a multi-GiB tensor is touched) under
``kernels.launch.capture_launches`` and returns the launch it made, ready to compile. torch and
the kernels are imported only when a launch is captured (in the compiling processes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

BENCHMARK_SHAPE = (4096, 32000)  # the case (docs/design.md's roofline)


@dataclass(frozen=True)
class Config:
    """One kernel configuration at one shape."""

    kernel: str  # partitioned | bidirectional | grad_scale
    rows: int
    classes: int
    teacher: str = ""  # partitioned: dense-<dtype> or top<K>-<tail>-<id dtype>
    mode: str = ""  # partitioned: live | fixed | best | plain; grad_scale: "tail" (remainder)
    score: str = "label"  # partitioned: the partition score, label | confidence
    models: int = 0  # bidirectional: N
    stop_grad: bool = True
    temperature: float = 1.0
    dtype: str = "bfloat16"  # the student's (every model's) logits; grad_scale: the gradient's
    per_row: bool = False  # grad_scale: one factor a row (reduction "none"), else a scalar
    teacher_lse: bool = False  # partitioned, dense, T != 1: the teacher's lse at T is given

    @property
    def launched(self) -> Config:
        """The configuration as its launch is made, at no shape: launches that differ only in
        shape compile to one kernel (shapes are not specialised on), and ``plain`` launches
        as ``best`` over the teachers' mixture (one column)."""
        return replace(self, rows=0, classes=0, mode="best" if self.mode == "plain" else self.mode)


TEMPERATURES = (1.0, 2.0)  # every KD configuration at both (T = 2 has its own compiled path)
STUDENT_DTYPES = ("bfloat16", "float32")  # many loops cast the logits to fp32 first


def configurations(shapes: list[tuple[int, int]]) -> list[Config]:
    """Every configuration the issue asks the check to cover, at every shape: each KD kernel's
    at T = 1 and 2 with bf16 and fp32 logits."""
    teachers = [f"dense-{d}" for d in ("float16", "bfloat16", "float32")]
    teachers += [f"top{k}-bucket-{i}" for k in (10, 100) for i in ("int32", "int64")]
    teachers += [f"top10-{tail}-int64" for tail in ("uniform", "sampled")]
    kd_axes = list(itertools.product(TEMPERATURES, STUDENT_DTYPES))
    configs = [
        Config("partitioned", rows, classes, teacher, mode, temperature=t, dtype=dtype)
        for (rows, classes), teacher, mode, (t, dtype) in itertools.product(
            shapes, teachers, ("live", "fixed", "best"), kd_axes
        )
    ]
    configs += [  # training's dense targets at T != 1 carry the teacher's lse at T
        Config("partitioned", rows, classes, teacher, mode, temperature=2.0, dtype=dtype,
               teacher_lse=True)
        for (rows, classes), teacher, mode, dtype in itertools.product(
            shapes, teachers[:3], ("live", "fixed", "best"), STUDENT_DTYPES
        )
    ]  # fmt: skip
    if BENCHMARK_SHAPE in shapes:  # plain KD's launch, and the label-free partition score
        rows, classes = BENCHMARK_SHAPE
        for t, dtype in kd_axes:
            configs += [
                Config("partitioned", rows, classes, "dense-float32", "plain", temperature=t,
                       dtype=dtype),
                Config("partitioned", rows, classes, "dense-bfloat16", "live", "confidence",
                       temperature=t, dtype=dtype),
            ]  # fmt: skip
    configs += [  # any other T: its own compiled path
        Config("partitioned", rows, classes, teacher, "live", temperature=4.0, teacher_lse=lse)
        for (rows, classes), (teacher, lse) in itertools.product(
            shapes,
            (("dense-bfloat16", False), ("dense-bfloat16", True), ("top10-bucket-int64", False)),
        )
    ]
    configs += [
        Config("bidirectional", rows, classes, models=n, stop_grad=stop, temperature=t, dtype=dtype)
        for (rows, classes), n, stop, (t, dtype) in itertools.product(
            shapes, (2, 3, 4), (True, False), kd_axes
        )
    ]
    configs += [  # the backward's scale pass (kernels.grad_scale)
        Config("grad_scale", rows, classes, dtype=dtype)
        for (rows, classes), dtype in itertools.product(shapes, ("bfloat16", "float16", "float32"))
    ]
    if BENCHMARK_SHAPE in shapes:
        configs.append(Config("grad_scale", *BENCHMARK_SHAPE, per_row=True))
    # the flat kernel's masked remainder (B x C not a whole number of blocks)
    configs.append(Config("grad_scale", 33, 21841, mode="tail"))
    return configs


def _empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """Uninitialised CPU memory: the pages of a multi-GiB tensor are never touched."""
    import torch

    return torch.empty(shape, dtype=dtype)


def capture(config: Config) -> Any:
    """The one launch the config's launcher makes (kernels.launch.Launch)."""
    import torch

    from fastkd.kernels import (
        PoolTargets,
        bidirectional_kd,
        bidirectional_kernel,
        grad_scale,
        partitioned_kd,
        partitioned_kernel,
    )
    from fastkd.kernels.launch import capture_launches

    dtype = getattr(torch, config.dtype)
    rows, classes = config.rows, config.classes
    labels = torch.zeros(rows, dtype=torch.int64)
    with capture_launches() as launches:
        if config.kernel == "grad_scale":
            factor = torch.ones(rows) if config.per_row else torch.tensor(1.0)
            grad_scale.scale_rows_(_empty((rows, classes), dtype), factor)
            launches[:] = launches[-1:] if config.mode == "tail" else launches[:1]
        elif config.kernel == "bidirectional":
            logits = [_empty((rows, classes), dtype) for _ in range(config.models)]
            grads = [_empty((rows, classes), dtype) for _ in range(config.models)]
            cfg = bidirectional_kd.BidirectionalKDConfig(
                stop_grad=config.stop_grad, temperature=config.temperature, reduction="sum"
            )
            bidirectional_kernel.launch_bidirectional_kd(logits, grads, labels, cfg)
        else:
            # plain: the launch after PoolTargets.mixture, one fp32 column read as best
            members = 1 if config.mode == "plain" else 2
            kind, *tail, teacher_dtype = config.teacher.split("-")
            true_logprob = torch.zeros(rows, members)
            if kind == "dense":
                targets = PoolTargets(
                    true_logprob,
                    logprobs=_empty((rows, members, classes), getattr(torch, teacher_dtype)),
                    logprobs_lse=torch.zeros(rows, members) if config.teacher_lse else None,
                    lse_temperature=config.temperature if config.teacher_lse else None,
                )
            else:
                k, ids = int(kind.removeprefix("top")), getattr(torch, teacher_dtype)
                targets = PoolTargets(
                    true_logprob,
                    topk_logprobs=_empty((rows, members, k), torch.float16),
                    topk_ids=torch.zeros(rows, members, k, dtype=ids),
                    log_tail=torch.zeros(rows, members),
                    log_tail_sqrt=torch.zeros(rows, members),
                    tail_ids=torch.zeros(rows, members, 8, dtype=ids)
                    if tail == ["sampled"]
                    else None,
                    tail=tail[0],
                )
            cfg = partitioned_kd.PartitionedKDConfig(
                mode=config.launched.mode,
                self_index=1 if config.mode == "fixed" else None,
                partition_score=config.score,
                temperature=config.temperature,
                reduction="sum",
            )
            student = _empty((rows, classes), dtype)
            partitioned_kernel.launch_partitioned_kd(
                student, torch.empty_like(student), labels, targets, cfg, scores=true_logprob
            )
    (launch,) = launches
    return launch
