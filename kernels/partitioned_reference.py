"""Partitioned KD's torch reference, beside the fused kernel (``kernels.partitioned_kernel``),
which re-implements the same rule in registers. The config it reads is
``kernels.partitioned_kd``'s.

Per row (one sample view), with student logits z, label y and M stored pool members:

* The partition at T = 1 (``fastkd.partition.select_teacher``) compares scores
  (``PartitionScore``): ``label``, log p(y) (the member's stored ``true_logprob``, the student's
  log-softmax at y); ``confidence``, max_c log p(c) (``PoolTargets.max_logprob``; the student's
  largest log-probability), which needs no label. The best teacher is the first member of highest
  score, excluding the student's own column ``self_index``. ``live`` (offline Bi-KD): it teaches
  only where its score is strictly above the current student's; ``fixed`` (KL+DP): the target is
  the teacher where it scores strictly above the student's stored initial self, else the stored
  self; ``best`` (best-teacher KD): the teacher on every row; ``plain`` (plain KD): the mean of
  the teachers' distributions at T on every row (``PoolTargets.mixture``; ``plain_as_best`` makes
  it one column read as ``best``, so the kernel and this reference share it).
* Loss = ce_weight * CE(z, y) + kd_weight * T^2 * KL(p_target,T || softmax(z / T)) on rows with a
  target (CE only elsewhere). Rows labelled ``ignore_index`` count for nothing and get zero
  gradient; ``mean`` divides by the number of the other rows.
* The target and its divergence are ``PoolTargets.target_logprobs`` and ``.divergence``: dense,
  or sparse with a uniform, bucket or sampled tail (``kernels.targets``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastkd.choices import PartitionMode, PartitionScore
from fastkd.kernels import common
from fastkd.kernels.common import KDStats
from fastkd.kernels.targets import PoolTargets
from fastkd.partition import NO_TEACHER, best_member, logits_score, select_teacher

if TYPE_CHECKING:  # a type hint only: the config's module imports this one
    from fastkd.kernels.partitioned_kd import PartitionedKDConfig


def plain_as_best(
    targets: PoolTargets, labels: Tensor, num_classes: int, config: PartitionedKDConfig
) -> tuple[PoolTargets, PartitionedKDConfig]:
    """``plain`` as the kernels run it: the teachers' mixture at T as one column
    (``plain_targets``), read as ``best`` (``plain_config``); other modes unchanged."""
    if config.mode is not PartitionMode.PLAIN:
        return targets, config
    return plain_targets(targets, labels, num_classes, config), plain_config(config)


def plain_targets(
    targets: PoolTargets, labels: Tensor, num_classes: int, config: PartitionedKDConfig
) -> PoolTargets:
    """Plain KD's one column: the teachers' mixture at T (``PoolTargets.mixture``; labels of
    ignored rows are read as class 0), carrying its log-sum-exp at T. Training makes it where
    its targets are made (the store reader's thread, the live teachers' step), not in the loss."""
    mixed = targets.mixture(config.temperature, labels, num_classes, exclude=config.self_index)
    return mixed.with_lse(config.temperature)


def plain_config(config: PartitionedKDConfig) -> PartitionedKDConfig:
    """A ``plain`` config as the kernels run it on ``plain_targets``: ``best`` on one column,
    which teaches every row, so there is nothing to partition and no score is compared."""
    if config.mode is not PartitionMode.PLAIN:
        return config
    return dataclasses.replace(
        config, mode=PartitionMode.BEST, self_index=None, partition_score=PartitionScore.LABEL
    )


def partitioned_kd_reference(
    student_logits: Tensor, labels: Tensor, targets: PoolTargets, config: PartitionedKDConfig
) -> tuple[Tensor, KDStats]:
    """Plain torch autograd math (fp32, or fp64 for fp64 logits): the independent check.

    ``KDStats.p_student`` / ``p_teacher`` are exp of the scores the partition compared."""
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    temperature = config.temperature
    valid = labels != config.ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    targets, config = plain_as_best(targets, safe_labels, z.shape[1], config)
    student_logprob = z.log_softmax(-1).gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    student_score = logits_score(z.detach(), safe_labels, config.partition_score)
    pool_score = targets.partition_scores(config.partition_score)
    chosen = select_teacher(
        pool_score, config.mode, student_score=student_score, self_index=config.self_index
    )
    chosen = torch.where(valid, chosen, NO_TEACHER)
    has_target = chosen != NO_TEACHER
    kl = targets.divergence(chosen.clamp_min(0), safe_labels, z, temperature)
    kl = torch.where(has_target, kl, 0.0)
    row_loss = config.ce_weight * -student_logprob + config.kd_weight * temperature**2 * kl
    row_loss = torch.where(valid, row_loss, 0.0)

    teacher, _ = best_member(pool_score, exclude=config.self_index)
    teacher_score = pool_score.gather(1, teacher.unsqueeze(1)).squeeze(1)
    stats = KDStats(
        chosen=chosen,
        kl=kl.detach(),
        p_student=torch.where(valid, student_score.exp().to(z.dtype), 0.0),
        p_teacher=torch.where(valid, teacher_score.exp(), 0.0),
    )
    return common.reduce_loss(row_loss, labels, config), stats
