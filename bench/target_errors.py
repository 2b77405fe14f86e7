"""A compressed soft target's errors against the dense teacher: what is stored, and how far off.

``Setting`` is what a store keeps of a teacher's row (dense fp16, or a top-k with a tail model);
``measure_setting`` makes it as a store does (``PoolTargets.from_logits``) and reads it back
through ``PoolTargets.divergence``; ``error_stats`` compares the KL and its gradient in the
student with the dense fp64 reference (``dense_kl``). Shared by the parts of ``fastkd bench
targets`` (``fastkd.bench.targets``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastkd.compression import DEFAULT_TAIL, TailModel, raw_bytes_per_view
from fastkd.kernels import PoolTargets


@dataclass(frozen=True)
class Setting:
    """What is stored of a teacher's row: dense (fp16) or a top-k with a tail model."""

    tail: str  # "dense" or a TailModel value
    topk: int = 0
    tail_samples: int = 0

    @property
    def label(self) -> str:
        if self.tail == "dense":
            return "dense"
        draws = f"+{self.tail_samples}" if self.tail == TailModel.SAMPLED.value else ""
        return f"{self.tail} k={self.topk}{draws}"

    def bytes_per_view(self, num_classes: int) -> int:
        tail = DEFAULT_TAIL if self.tail == "dense" else TailModel(self.tail)
        return raw_bytes_per_view(num_classes, self.topk, tail, self.tail_samples)

    def describe(self, num_classes: int) -> dict[str, Any]:
        return {
            "tail": self.tail,
            "topk": self.topk,
            "tail_samples": self.tail_samples,
            "bytes": self.bytes_per_view(num_classes),
        }


DENSE = Setting("dense")


def dense_kl(teacher: Tensor, student: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """[B] KL(softmax(t / T) || softmax(z / T)) of fp64 logits and its gradient in z [B, C]."""
    z = student.detach().clone().requires_grad_()
    log_p = (teacher / temperature).log_softmax(-1)
    log_q = (z / temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


def stored_kl(
    targets: PoolTargets, labels: Tensor, student: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """[B] the stored target's divergence (member 0) and its gradient in the fp64 student [B, C]."""
    z = student.detach().clone().requires_grad_()
    member = torch.zeros(z.shape[0], dtype=torch.long)
    kl = targets.divergence(member, labels, z, temperature)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the error math: these are figures, not timings, and the rows are
    small, where two threads on a shared two-core host wait on each other (many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rounded(value: float) -> float | None:
    """Four significant digits for the JSON; None for a NaN or an infinity."""
    return None if not math.isfinite(value) else float(f"{value:.4g}")


def quantile(values: Tensor, q: float) -> float | None:
    """The ``q`` quantile of the finite values, rounded; None when none is finite."""
    finite = values[torch.isfinite(values)]
    return rounded(torch.quantile(finite, q).item()) if finite.numel() else None


def error_stats(kl: Tensor, grad: Tensor, ref_kl: Tensor, ref_grad: Tensor) -> dict[str, Any]:
    """Per-row errors against the dense reference, as median and tail quantile (the bad end:
    p90 of the errors, p10 of the cosine), and the totals over the rows (errors weighted by the
    rows' KL and gradient sizes, as a batch's loss weights them)."""
    ref_norm = ref_grad.norm(dim=-1)
    kl_error = (kl - ref_kl).abs() / ref_kl
    grad_error = (grad - ref_grad).norm(dim=-1) / ref_norm
    cosine = (grad * ref_grad).sum(-1) / (grad.norm(dim=-1) * ref_norm)
    return {
        "kl_rel_error": {"median": quantile(kl_error, 0.5), "p90": quantile(kl_error, 0.9)},
        "grad_rel_l2": {"median": quantile(grad_error, 0.5), "p90": quantile(grad_error, 0.9)},
        "grad_cosine": {"median": quantile(cosine, 0.5), "p10": quantile(cosine, 0.1)},
        "kl_rel_error_total": rounded(((kl - ref_kl).abs().sum() / ref_kl.sum()).item()),
        "grad_rel_l2_total": rounded(((grad - ref_grad).norm() / ref_grad.norm()).item()),
        "kl_signed_rel_error_median": quantile((kl - ref_kl) / ref_kl, 0.5),
    }


def measure_setting(
    teacher: Tensor,
    student: Tensor,
    labels: Tensor,
    setting: Setting,
    temperatures: Sequence[float],
    references: dict[float, tuple[Tensor, Tensor]],
    draws: int,
    generator: torch.Generator,
) -> dict[float, dict[str, Any]]:
    """Error statistics of one setting at each temperature; for the sampled tail those of one
    draw per row and, in ``mean_of_draws``, of the mean KL and gradient over ``draws`` draws."""
    count = draws if setting.tail == TailModel.SAMPLED.value else 1
    pool = teacher.unsqueeze(1)
    made = [
        PoolTargets.from_logits(
            pool,
            labels,
            setting.topk,
            DEFAULT_TAIL if setting.tail == "dense" else setting.tail,
            setting.tail_samples,
            generator,
        )
        for _ in range(count)
    ]
    out = {}
    for temperature in temperatures:
        ref_kl, ref_grad = references[temperature]
        measured = [stored_kl(targets, labels, student, temperature) for targets in made]
        stats = error_stats(*measured[0], ref_kl, ref_grad)
        if count > 1:
            mean_kl = torch.stack([kl for kl, _ in measured]).mean(0)
            mean_grad = torch.stack([grad for _, grad in measured]).mean(0)
            stats["mean_of_draws"] = {
                "draws": count,
                **error_stats(mean_kl, mean_grad, ref_kl, ref_grad),
            }
        out[temperature] = stats
    return out


def entropy_range(teacher: Tensor) -> dict[str, float | None]:
    """Min / median / max of the rows' entropy at T = 1, in nats."""
    log_p = teacher.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return {
        "min": rounded(entropy.min().item()),
        "median": quantile(entropy, 0.5),
        "max": rounded(entropy.max().item()),
    }
