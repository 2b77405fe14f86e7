"""Live bidirectional KD's torch reference, beside the fused kernel
(``kernels.bidirectional_kernel``), which re-implements the same rule in registers. The config it
reads is ``kernels.bidirectional_kd``'s.

Per row, with the logits z_1..z_N of N models (any mix of fp32/bf16/fp16) and label y:

* Partition at T = 1 (``fastkd.partition.select_pool_teacher``): the model of highest log p(y)
  teaches every other one. Two models follow Bi-KD exactly (an exact tie goes to B); for N > 2 a
  tie for the best gives the row no KD term.
* Loss = ce_weight * sum_m CE(z_m, y) + kd_weight * T^2 * sum_{m != teacher} KL(p_teacher,T ||
  p_m,T). Ignored rows count for nothing; ``mean`` divides by the number of the other rows.
* ``stop_grad=True`` (default, standard KD): the KL terms send no gradient to the teacher.
  ``stop_grad=False`` reproduces the Bi-KD reference code, where the teacher also gets
  d(T^2 KL(p || q))/dz_t = T * p * (log p - log q - KL) from each learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fastkd.kernels import common
from fastkd.kernels.common import KDStats
from fastkd.partition import NO_TEACHER, select_pool_teacher

if TYPE_CHECKING:  # a type hint only: the config's module imports this one
    from fastkd.kernels.bidirectional_kd import BidirectionalKDConfig


def bidirectional_kd_reference(
    logits: Sequence[Tensor], labels: Tensor, config: BidirectionalKDConfig
) -> tuple[Tensor, KDStats]:
    """Plain torch autograd math (fp32, or fp64 if any input is fp64): the independent check."""
    dtype = torch.float32
    for z in logits:
        dtype = torch.promote_types(dtype, z.dtype)
    z = torch.stack([model_logits.to(dtype) for model_logits in logits])  # [N, B, C]
    num_models, num_rows, _ = z.shape
    temperature = config.temperature
    valid = labels != config.ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    label_index = safe_labels.view(1, -1, 1).expand(num_models, -1, 1)
    member_logprob = z.log_softmax(-1).gather(2, label_index).squeeze(2).T  # [B, N]
    teacher = select_pool_teacher(member_logprob.detach())
    teacher = torch.where(valid, teacher, NO_TEACHER)
    has_teacher = teacher != NO_TEACHER

    log_p = (z / temperature).log_softmax(-1)
    teacher_log_p = log_p[teacher.clamp_min(0), torch.arange(num_rows, device=z.device)]
    if config.stop_grad:
        teacher_log_p = teacher_log_p.detach()
    kl = (teacher_log_p.exp() * (teacher_log_p - log_p)).sum(-1)  # [N, B]
    models = torch.arange(num_models, device=z.device).unsqueeze(1)
    kl = torch.where((models != teacher) & has_teacher, kl, 0.0).sum(0)
    row_loss = config.ce_weight * -member_logprob.sum(1) + config.kd_weight * temperature**2 * kl
    row_loss = torch.where(valid, row_loss, 0.0)

    best_two = member_logprob.detach().topk(2, dim=1).values.exp()
    stats = KDStats(
        chosen=teacher,
        kl=kl.detach(),
        p_student=torch.where(valid, best_two[:, 1], 0.0),
        p_teacher=torch.where(valid, best_two[:, 0], 0.0),
    )
    return common.reduce_loss(row_loss, labels, config), stats
