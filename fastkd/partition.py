"""The partition rule: per sample, who teaches whom. One home for it.

The score a partition compares (``PartitionScore``) is, with ``label``, the log-probability of the
true class at temperature 1, ``log p_m(y) = z_m[y] - logsumexp(z_m)``: comparing
log-probabilities is the same as comparing probabilities, and it is exact for stored targets (the
store keeps log p_m(y) in fp32 whatever else it drops, so it is exact even when y is outside the
stored top-k). With ``confidence`` it is the model's confidence in its own top class, ``max_c log
p_m(c)``, and the partition needs no label (Roth et al.'s unsupervised KL+DP). The partition is
always taken at T = 1, whatever temperature the KL term uses, as in Bi-KD and KL+DP (both use
T = 1).

The Triton kernels re-implement these comparisons in-register; their torch references call the
functions below, and the kernel tests hold the two to the same answers.
"""

from __future__ import annotations

import torch

from fastkd.choices import PartitionMode, PartitionScore
from fastkd.errors import ConfigError

NO_TEACHER = -1


def logits_score(
    logits: torch.Tensor, labels: torch.Tensor, score: PartitionScore | str
) -> torch.Tensor:
    """[B] the partition score of dense logits [B, C] (fp32 math): log p(y), or max_c log p(c)."""
    if PartitionScore(score) is PartitionScore.LABEL:
        return true_class_logprob(logits, labels)
    return logits.float().log_softmax(-1).amax(-1)


def true_class_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y) at T = 1 of dense logits [..., C] for labels [...] (fp32 math)."""
    z = logits.float()
    safe = labels.clamp_min(0).unsqueeze(-1)
    return z.gather(-1, safe).squeeze(-1) - torch.logsumexp(z, dim=-1)


def best_member(
    scores: torch.Tensor, exclude: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the highest score per row of ``scores`` [B, M], ignoring column ``exclude``.

    Returns ``(index [B] int64, unique [B] bool)``: the first index among equal best scores, and
    whether the best was unique. With one candidate left the best is unique by definition.
    """
    s = scores.float().clone()
    if exclude is not None:
        s[:, exclude] = float("-inf")
    best_score, index = s.max(dim=1)
    ties = (s == best_score.unsqueeze(1)).sum(dim=1)
    return index, ties == 1


def select_teacher(
    pool_score: torch.Tensor,
    mode: PartitionMode | str,
    *,
    student_score: torch.Tensor | None = None,
    self_index: int | None = None,
) -> torch.Tensor:
    """Which pool member is the target of each row, or ``NO_TEACHER``.

    pool_score: [B, M] the pool members' partition scores (``PartitionScore``: log p(y), or
        max_c log p(c); ``PoolTargets.partition_scores``).
    student_score: [B] the current student's, of the same kind (needed by ``live``).
    self_index: the student's own column in the pool, if it is a member. It never teaches in
        ``live`` and ``best``; in ``fixed`` it is the fallback target (the student's initial
        outputs), chosen where no teacher scores strictly higher (KL+DP: m = [p_t(y) > p_s(y)]).

    Among teachers, the first of equal best scores wins. ``live`` teaches only where the teacher is
    strictly more confident than the current student (Bi-KD: ties go to the student). ``plain``
    has no partition: its target is the mixture of the teachers (``PoolTargets.mixture``), which
    the losses make one column; here it is accepted only as that one column (its only teacher),
    so that a pool that was not mixed is never read as ``best`` under the name ``plain``.
    """
    mode = PartitionMode(mode)
    if pool_score.dim() != 2:
        raise ConfigError(f"pool_score must be [B, M], got shape {tuple(pool_score.shape)}")
    num_members = pool_score.shape[1]
    if self_index is not None and not 0 <= self_index < num_members:
        raise ConfigError(f"self_index {self_index} is outside the pool of {num_members} members")
    if mode is PartitionMode.FIXED and self_index is None:
        raise ConfigError("partition mode 'fixed' needs the student in the pool (self_index)")
    if num_members - (self_index is not None) < 1:
        raise ConfigError("the pool has no teacher besides the student")

    if mode is PartitionMode.PLAIN and num_members - (self_index is not None) != 1:
        raise ConfigError(
            "partition mode 'plain' reads one column, the teachers' mixture "
            "(PoolTargets.mixture / plain_as_best); got a pool of several teachers"
        )
    teacher, _ = best_member(pool_score, exclude=self_index)
    teacher_score = pool_score.float().gather(1, teacher.unsqueeze(1)).squeeze(1)
    if mode in (PartitionMode.BEST, PartitionMode.PLAIN):
        return teacher
    if mode is PartitionMode.FIXED:
        own = pool_score[:, self_index].float()
        return torch.where(teacher_score > own, teacher, torch.full_like(teacher, self_index))
    if student_score is None:
        raise ConfigError("partition mode 'live' needs the current student's score")
    teaches = teacher_score > student_score.float()
    return torch.where(teaches, teacher, torch.full_like(teacher, NO_TEACHER))


def select_pool_teacher(member_logprob: torch.Tensor) -> torch.Tensor:
    """Bidirectional rule for N models trained together: per row the most confident member
    teaches all others.

    Two models follow Bi-KD exactly: m_A = [p_A(y) > p_B(y)], m_B = [p_A(y) <= p_B(y)], so an
    exact tie goes to B. For N > 2 (docs/method.md), a tie for the best gives the row no KD term
    (``NO_TEACHER``).
    """
    if member_logprob.dim() != 2 or member_logprob.shape[1] < 2:
        raise ConfigError(f"need [B, N>=2] log-probabilities, got {tuple(member_logprob.shape)}")
    if member_logprob.shape[1] == 2:
        a, b = member_logprob.float().unbind(1)
        return (a <= b).long()
    index, unique = best_member(member_logprob)
    return torch.where(unique, index, torch.full_like(index, NO_TEACHER))
