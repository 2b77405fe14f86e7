"""What is kept of a model's logits: one home for the compression rule and the tail models.

Every target keeps, at T = 1, the exact fp32 log-probability of the label (``true_logprob``), so
the partition rule compares exact confidences whatever else is dropped. The distribution itself
is kept either dense (every class's log-probability in fp16) or sparse: the top-k classes' ids and
fp16 log-probabilities, and two numbers about the tail, the classes outside the top-k and the
label: ``log_tail = log sum_tail p_i`` (its mass at T = 1, fp32, summed over the tail, not 1
minus the rest: exact even when tiny) and ``log_tail_sqrt = log sum_tail p_i^(1/2)`` (its mass at
T = 2 before normalisation, fp16: it only sets the tail's mass at T != 1). With ``log n`` (n tail
classes) they pin ``A(b) = log sum_tail p_i^b`` at b = 0, 1/2 and 1; elsewhere ``A`` is
estimated by the parabola through them (exact for Gaussian tail logits) kept within the bounds
every tail obeys (``tail_logmass``): the tail's mass is exact at T = 1 and 2, an estimate at
other T. Without the second number the tail's mass at T = 2 is a guess that misses by far more
than the tail's shape does.

Log-probabilities, not logits: fp16 keeps a log-probability near 0 (the classes that carry the
mass) to about 1e-6, where it keeps a logit of 20 to 1e-2, so the stored distribution sums to 1
within rounding, and no separate log-sum-exp is needed. A sparse target's unknown classes are
described by one of three tail models:

* ``uniform``: the tail mass is shared equally by the unknown classes (FKD's rule);
* ``bucket``: the tail is one bucket; the KL compares the (known + 1)-bucket distributions, so
  the student's shape inside the tail is left free;
* ``sampled``: the tail is represented by ``tail_samples`` ids drawn from it by systematic
  sampling (one uniform per row, sorted ids, repeats allowed), each carrying ``1 / tail_samples``
  of the tail mass: unbiased at T = 1 for every class; each stored view has its own draws, so
  training averages over at most V draw sets (after Sparse Logit Sampling, Anshumann et al.,
  2025).

How each is read at a temperature T, and the loss it gives, is in ``fastkd.kernels.targets``.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

from fastkd.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the store reads without it
    import torch

FP16_LOWEST = -65504.0  # stored log-probabilities are clamped here: finite, exp() == 0


class TailModel(str, Enum):
    """How a sparse target's classes outside the top-k and the label are described."""

    UNIFORM = "uniform"
    BUCKET = "bucket"
    SAMPLED = "sampled"

    def __str__(self) -> str:  # as messages and tables name it: its option value
        return self.value


DEFAULT_TAIL = TailModel.UNIFORM
MAX_TAIL_SAMPLES = 64  # the kernel compares the draws pairwise in registers (checked at 64)


def parse_tail(tail: str | TailModel) -> TailModel:
    """A ``TailModel`` from its name, with the choices in the error."""
    try:
        return TailModel(tail)
    except ValueError:
        choices = ", ".join(t.value for t in TailModel)
        raise ConfigError(f"unknown tail model {tail!r}; choose one of {choices}") from None


def id_bytes(num_classes: int) -> int:
    """Bytes of a stored class id: uint16 up to 65536 classes, else uint32."""
    return 2 if num_classes <= 65536 else 4


def raw_bytes_per_view(num_classes: int, topk: int, tail: TailModel, tail_samples: int) -> int:
    """Uncompressed bytes of one model's target per stored view (what equal-bytes compares)."""
    if topk == 0:
        return 4 + 2 * num_classes
    samples = tail_samples if tail is TailModel.SAMPLED else 0
    return 4 + 4 + 2 + topk * (2 + id_bytes(num_classes)) + samples * id_bytes(num_classes)


def compress_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    topk: int,
    tail: TailModel = DEFAULT_TAIL,
    tail_samples: int = 0,
    uniforms: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Logits [..., C] and labels [...] (valid class ids) -> the kept tensors, on their device.

    Always ``true_logprob`` [...] fp32. Dense (``topk == 0``): ``logprobs`` [..., C] fp16.
    Sparse: ``topk_logprobs`` [..., K] fp16 sorted descending, ``topk_ids`` [..., K] int64,
    ``log_tail`` [...] fp32 and ``log_tail_sqrt`` [...] fp16 (``-inf`` when nothing is outside
    the known classes); ``sampled``
    adds ``tail_ids`` [..., S] int64, sorted, drawn with ``uniforms`` [...] in [0, 1).
    Everything is computed from fp32 log-softmax of the logits, whatever their dtype.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ConfigError(
            f"labels must be shaped like the logits without their class axis: logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    num_classes = logits.shape[-1]
    if not 0 <= topk <= num_classes:
        raise ConfigError(
            f"top-k must be in [0, {num_classes}] for {num_classes} classes, got {topk}"
        )
    logprobs = logits.float().log_softmax(-1)
    labels = labels.long().unsqueeze(-1)
    out = {"true_logprob": logprobs.gather(-1, labels).squeeze(-1)}
    if topk == 0:
        out["logprobs"] = logprobs.clamp_min(FP16_LOWEST).half()
        return out
    values, ids = logprobs.topk(topk, dim=-1, largest=True, sorted=True)
    out["topk_logprobs"] = values.clamp_min(FP16_LOWEST).half()
    out["topk_ids"] = ids
    outside = logprobs.scatter(-1, ids, float("-inf")).scatter(-1, labels, float("-inf"))
    log_tail = outside.logsumexp(-1)
    out["log_tail"] = log_tail
    out["log_tail_sqrt"] = (0.5 * outside).logsumexp(-1).half()
    if tail is TailModel.SAMPLED:
        if not 1 <= tail_samples <= MAX_TAIL_SAMPLES:
            raise ConfigError(
                f"the sampled tail needs 1 <= tail_samples <= {MAX_TAIL_SAMPLES}, got {tail_samples}"
            )
        if uniforms is None or uniforms.shape != log_tail.shape:
            raise ConfigError(
                f"the sampled tail needs one uniform per row, {tuple(log_tail.shape)}"
            )
        out["tail_ids"] = systematic_draws(outside, log_tail, tail_samples, uniforms, labels)
    return out


def systematic_draws(
    outside: torch.Tensor,
    log_tail: torch.Tensor,
    count: int,
    uniforms: torch.Tensor,
    fallback: torch.Tensor,
) -> torch.Tensor:
    """``count`` sorted ids per row from exp(outside - log_tail), positions (u + j) / count.

    Class j is drawn floor or ceil of count * p_j times, so each class's expected share is exact.
    Rows without tail mass get their ``fallback`` id (they carry no mass; readers ignore them).
    """
    import torch

    weights = (outside.double() - log_tail.double().unsqueeze(-1)).exp()
    cdf = weights.cumsum(-1)
    total = cdf[..., -1:]
    has_tail = total > 0
    cdf = torch.where(has_tail, cdf / torch.where(has_tail, total, 1.0), 1.0)
    steps = torch.arange(count, device=outside.device, dtype=torch.float64)
    positions = (uniforms.double().unsqueeze(-1) + steps) / count
    ids = torch.searchsorted(cdf.contiguous(), positions.contiguous(), right=True)
    # A position that rounds to 1.0 lands past the end: take the last class with weight.
    ids = torch.minimum(ids, (cdf < 1).sum(-1, keepdim=True))
    return torch.where(has_tail, ids, fallback.expand_as(ids))


def tail_logmass(
    log_tail: torch.Tensor, log_tail_sqrt: torch.Tensor, tail_count: torch.Tensor, beta: float
) -> torch.Tensor:
    """An estimate of ``A(beta) = log sum_tail p_i^beta``, the tail's unnormalised mass at
    T = 1 / beta: the stored values at beta = 1 and 1/2, elsewhere the parabola through
    (0, log n), (1/2, log_tail_sqrt) and (1, log_tail), kept within the bounds every tail obeys
    (between beta A(1) and (1 - beta) log n + beta A(1): power means). ``-inf`` where the tail
    is empty or massless."""
    import torch

    log_tail_sqrt = log_tail_sqrt.to(log_tail.dtype)
    if beta == 1.0:
        value = log_tail
    elif beta == 0.5:
        value = log_tail_sqrt
    else:
        a0 = tail_count.to(log_tail.dtype).clamp_min(1).log()
        d1, dh = log_tail - a0, log_tail_sqrt - a0
        a2 = 2.0 * (d1 - 2.0 * dh)
        value = a0 + (d1 - a2) * beta + a2 * beta * beta
        power, chord = beta * log_tail, (1.0 - beta) * a0 + beta * log_tail
        value = value.clamp(torch.minimum(power, chord), torch.maximum(power, chord))
    empty = (tail_count <= 0) | torch.isneginf(log_tail)
    return torch.where(empty, float("-inf"), value)
