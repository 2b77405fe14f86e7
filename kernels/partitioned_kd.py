"""Partitioned KD against stored pool targets: one fused Triton kernel beside its torch reference.

Per row (one sample view), with student logits z, label y and M stored pool members:

* Confidence and partition at T = 1 (``fastkd.partition.select_teacher``): ``log p_m(y) =
  true_logit_m - lse_m``; the best teacher is the first member of highest log p(y), excluding the
  student's own column ``self_index``. ``live`` (Bi-KD): it teaches only where log p_t(y) is strictly
  above the current student's; ``fixed`` (KL+DP): the target is the teacher where it is strictly
  above the student's stored initial self, else the stored self; ``all``: the teacher on every row.
* Loss = ce_weight * CE(z, y) + kd_weight * T^2 * KL(p_target,T || softmax(z / T)) on rows with a
  target (CE only elsewhere). Rows labelled ``ignore_index`` count for nothing and get zero
  gradient; ``mean`` divides by the number of the other rows.
* Sparse targets use the uniform-tail full-vocabulary distribution of ``kernels.targets`` (the
  tests hold sparse == dense when k = C). Its error against the dense teacher it summarises
  (``fastkd.bench.kernels.tail_error``; synthetic C = 1000 Gaussian logits, std 2.5, a pessimistic
  case since their tails are far from uniform; measured on CPU): at T = 1 the mean relative error
  of the KL is 118% at k = 10 and 20% at k = 100, of the KD gradient (L2) 21% and 3%; at T = 2,
  k = 100: 102% and 36%. The tail matters more as T grows: store a large k when training at T > 1.

The Triton kernel runs one program per row. Pass 1 reads the student row (and, for a dense target,
the candidate member's row: the best teacher, or in ``fixed`` mode teacher-or-self, both known
before the student is read) once, keeping online log-sum-exps at T = 1 and at T, the teacher's
online log-sum-exp at T and E_p[(t - z) / T], so KL = E_p[(t - z) / T] - lse_t,T + lse_s,T needs
no second pass; a sparse target instead keeps the student's row sum, which gives the tail's
sum of log q. Pass 2 writes the gradient ce_weight * (softmax(z) - onehot(y)) + kd_weight * T *
(q_T - p_T), dense with the tail probability; for sparse targets the known ids are then corrected
by a scatter (gathered before pass 2, so ``inplace_grad=True`` may overwrite the logits). No
B x C fp32 temporary is made; offsets are int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastkd.errors import ConfigError
from fastkd.kernels import common
from fastkd.kernels.common import KDStats
from fastkd.kernels.targets import TAIL_MASS_FLOOR, PoolTargets
from fastkd.partition import NO_TEACHER, PartitionMode, best_member, select_teacher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

_MODE_CODE = {PartitionMode.LIVE: 0, PartitionMode.FIXED: 1, PartitionMode.ALL: 2}


@dataclass(frozen=True)
class PartitionedKDConfig(common.KDLossConfig):
    """A partitioned KD loss: the partition mode and the student's own pool column, if any."""

    mode: PartitionMode = PartitionMode.LIVE
    self_index: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mode", PartitionMode(self.mode))
        if self.mode is PartitionMode.FIXED and self.self_index is None:
            raise ConfigError("partition mode 'fixed' needs the student's pool column self_index")


def partitioned_kd_reference(
    student_logits: Tensor, labels: Tensor, targets: PoolTargets, config: PartitionedKDConfig
) -> tuple[Tensor, KDStats]:
    """Plain torch autograd math (fp32, or fp64 for fp64 logits): the independent check."""
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    num_classes = z.shape[1]
    temperature = config.temperature
    valid = labels != config.ignore_index
    safe_labels = torch.where(valid, labels, 0).long()
    student_logprob = z.log_softmax(-1).gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    pool_logprob = targets.logprob()
    chosen = select_teacher(
        pool_logprob,
        config.mode,
        student_logprob=student_logprob.detach(),
        self_index=config.self_index,
    )
    chosen = torch.where(valid, chosen, NO_TEACHER)
    has_target = chosen != NO_TEACHER
    target_logits = targets.full_vocab_logits(chosen.clamp_min(0), safe_labels, num_classes)
    log_p = (target_logits.to(z.dtype) / temperature).log_softmax(-1)
    log_q = (z / temperature).log_softmax(-1)
    kl = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0).sum(-1)
    kl = torch.where(has_target, kl, 0.0)
    row_loss = config.ce_weight * -student_logprob + config.kd_weight * temperature**2 * kl
    row_loss = torch.where(valid, row_loss, 0.0)

    teacher, _ = best_member(pool_logprob, exclude=config.self_index)
    teacher_logprob = pool_logprob.gather(1, teacher.unsqueeze(1)).squeeze(1)
    stats = KDStats(
        chosen=chosen,
        kl=kl.detach(),
        p_student=torch.where(valid, student_logprob.detach().exp(), 0.0),
        p_teacher=torch.where(valid, teacher_logprob.exp(), 0.0),
    )
    return common.reduce_loss(row_loss, labels, config), stats


def partitioned_kd_loss(
    student_logits: Tensor, labels: Tensor, targets: PoolTargets, **options: Any
) -> tuple[Tensor, KDStats]:
    """Partitioned KD loss of ``student_logits`` [B, C] against stored pool ``targets``.

    ``options``: the fields of ``PartitionedKDConfig`` (mode, self_index, temperature, kd_weight,
    ce_weight, ignore_index, reduction, inplace_grad, max_block). Returns the loss (reduced, or
    [B] for ``reduction="none"``) and per-row ``KDStats``. ``inplace_grad`` (Triton path) writes
    the gradient over the logits: saves B x C memory when the caller does not reuse them.
    ``max_block`` caps the tile width along C (tests force the multi-tile path with it).
    """
    config = PartitionedKDConfig(**options)
    student_logits = common.check_logits(student_logits, "student_logits")
    common.check_labels(labels, student_logits, config.ignore_index)
    targets.check(*student_logits.shape, device=student_logits.device)
    if common.triton_backend(_partitioned_kd_kernel, [student_logits]):
        return common.run_function(_PartitionedKDFunction, student_logits, labels, targets, config)
    return partitioned_kd_reference(student_logits, labels, targets, config)


class PartitionedKDLoss(common.KDLossModule):
    """``partitioned_kd_loss`` as a module: ``loss, stats = criterion(logits, labels, targets)``."""

    config_class = PartitionedKDConfig

    def forward(
        self, student_logits: Tensor, labels: Tensor, targets: PoolTargets
    ) -> tuple[Tensor, KDStats]:
        return partitioned_kd_loss(student_logits, labels, targets, **vars(self.config))


class _PartitionedKDFunction(torch.autograd.Function):
    """Triton forward that writes the gradient; backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, student_logits, labels, targets, config):
        grad = student_logits if config.inplace_grad else torch.empty_like(student_logits)
        outputs = _launch_partitioned_kd(student_logits, grad, labels, targets, config)
        return common.forward_with_gradients(ctx, (grad,), outputs, labels, config)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        return *common.scaled_gradients(ctx, grad_loss), None, None, None


def _launch_partitioned_kd(
    student_logits: Tensor,
    grad: Tensor,
    labels: Tensor,
    targets: PoolTargets,
    config: PartitionedKDConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the kernel: fills ``grad`` and returns row losses and the four per-row stats."""
    num_rows, num_classes = student_logits.shape
    device = student_logits.device
    lse = targets.lse.float()
    true_logit = targets.true_logit.float()
    if targets.is_sparse:
        target_values = _unit_last_stride(targets.topk_logits)
        target_ids = _unit_last_stride(targets.topk_ids)
        ids_strides = target_ids.stride()[:2]
    else:
        target_values = _unit_last_stride(targets.logits)
        target_ids = lse  # unused by the dense kernel, any valid pointer
        ids_strides = (0, 0)
    row_loss, chosen, kl, p_student, p_teacher = common.stat_buffers(num_rows, device)
    block = common.tile_width(num_classes, config.max_block)
    _partitioned_kd_kernel[(num_rows,)](
        student_logits,
        student_logits.stride(0),
        grad,
        grad.stride(0),
        labels,
        lse,
        true_logit,
        lse.stride(0),
        lse.stride(1),
        target_values,
        target_values.stride(0),
        target_values.stride(1),
        target_ids,
        ids_strides[0],
        ids_strides[1],
        common.row_scale(labels, config.ignore_index, config.reduction, config.scale),
        row_loss,
        chosen,
        kl,
        p_student,
        p_teacher,
        num_classes,
        targets.num_members,
        targets.topk,
        -1 if config.self_index is None else config.self_index,
        *common.kernel_scalars(config),
        TAIL_MASS_FLOOR,
        MODE=_MODE_CODE[config.mode],
        SPARSE=targets.is_sparse,
        BLOCK_C=block,
        BLOCK_M=max(2, triton.next_power_of_2(targets.num_members)),
        BLOCK_K=max(2, triton.next_power_of_2(targets.topk)),
        num_warps=common.num_warps_for(block),
    )
    return row_loss, chosen, kl, p_student, p_teacher


def _unit_last_stride(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


if triton is None:  # pragma: no cover
    _partitioned_kd_kernel = None
else:

    @triton.jit
    def _partitioned_kd_kernel(
        student_ptr,
        student_stride,
        grad_ptr,
        grad_stride,
        labels_ptr,
        lse_ptr,
        true_logit_ptr,
        pool_row_stride,
        pool_member_stride,
        target_ptr,
        target_row_stride,
        target_member_stride,
        ids_ptr,
        ids_row_stride,
        ids_member_stride,
        scale_ptr,
        row_loss_ptr,
        chosen_ptr,
        kl_ptr,
        p_student_ptr,
        p_teacher_ptr,
        num_classes,
        num_members,
        topk,
        self_index,
        ignore_index,
        inv_temperature,
        temperature,
        kd_weight,
        ce_weight,
        tail_mass_floor,
        MODE: tl.constexpr,  # 0 live, 1 fixed, 2 all
        SPARSE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        label = tl.where(valid, label, 0)
        student_row = student_ptr + row * student_stride
        grad_row = grad_ptr + row * grad_stride

        # The partition's candidate, from stored scalars only (T = 1, first of equal best).
        members = tl.arange(0, BLOCK_M)
        in_pool = members < num_members
        pool_offsets = row * pool_row_stride + members * pool_member_stride
        pool_logprob = tl.load(true_logit_ptr + pool_offsets, mask=in_pool, other=0.0) - tl.load(
            lse_ptr + pool_offsets, mask=in_pool, other=0.0
        )
        teachers_logprob = tl.where(in_pool & (members != self_index), pool_logprob, float("-inf"))
        teacher = tl.argmax(teachers_logprob, axis=0, tie_break_left=True)
        teacher_logprob = tl.max(teachers_logprob, axis=0)
        if MODE == 1:
            self_logprob = tl.sum(tl.where(members == self_index, pool_logprob, 0.0), axis=0)
            candidate = tl.where(teacher_logprob > self_logprob, teacher, self_index)
        else:
            candidate = teacher
        candidate = candidate.to(tl.int64)
        target_row = target_ptr + row * target_row_stride + candidate * target_member_stride

        # Pass 1: online log-sum-exps of the student at T = 1 and T (one running max serves
        # both); dense: the candidate's log-sum-exp at T and sum p_t (t - z); sparse: sum z.
        row_max = float("-inf")
        sum_exp = 0.0
        sum_exp_t = 0.0
        student_sum = 0.0
        target_max = float("-inf")
        target_sum_exp_t = 0.0
        target_cross = 0.0
        for start in tl.range(0, num_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < num_classes
            z = tl.load(student_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(z, axis=0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            sum_exp_t = sum_exp_t * tl.exp((row_max - new_max) * inv_temperature) + tl.sum(
                tl.exp((z - new_max) * inv_temperature), axis=0
            )
            row_max = new_max
            if SPARSE:
                student_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            else:
                t = tl.load(target_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                new_target_max = tl.maximum(target_max, tl.max(t, axis=0))
                rescale = tl.exp((target_max - new_target_max) * inv_temperature)
                e = tl.exp((t - new_target_max) * inv_temperature)
                target_sum_exp_t = target_sum_exp_t * rescale + tl.sum(e, axis=0)
                t_minus_z = tl.where(mask, t, 0.0) - tl.where(mask, z, 0.0)
                target_cross = target_cross * rescale + tl.sum(e * t_minus_z, axis=0)
                target_max = new_target_max

        lse = row_max + tl.log(sum_exp)
        lse_t = row_max * inv_temperature + tl.log(sum_exp_t)
        z_label = tl.load(student_row + label, mask=valid, other=0.0).to(tl.float32)
        student_logprob = z_label - lse
        has_target = valid
        if MODE == 0:
            has_target = has_target & (teacher_logprob > student_logprob)

        if SPARSE:
            # Known logits: the candidate's top-k, plus its true-class logit when y is not in it;
            # the other classes share the rest of the T = 1 mass (kernels/targets.py).
            ks = tl.arange(0, BLOCK_K)
            known = ks < topk
            ids = tl.load(
                ids_ptr + row * ids_row_stride + candidate * ids_member_stride + ks,
                mask=known,
                other=-1,
            ).to(tl.int64)
            values = tl.load(target_row + ks, mask=known, other=0.0).to(tl.float32)
            known_values = tl.where(known, values, float("-inf"))
            member_offset = row * pool_row_stride + candidate * pool_member_stride
            member_lse = tl.load(lse_ptr + member_offset)
            member_label_logit = tl.load(true_logit_ptr + member_offset)
            label_is_extra = tl.sum((known & (ids == label)).to(tl.int32), axis=0) == 0
            extra = label_is_extra.to(tl.float32)
            known_mass = tl.sum(tl.exp(known_values - member_lse), axis=0) + extra * tl.exp(
                member_label_logit - member_lse
            )
            tail_count = (num_classes - topk - label_is_extra.to(tl.int32)).to(tl.float32)
            tail_logit = member_lse + tl.log(
                tl.maximum(1.0 - known_mass, tail_mass_floor) / tl.maximum(tail_count, 1.0)
            )
            has_tail = tail_count > 0
            target_max = tl.maximum(
                tl.max(known_values, axis=0),
                tl.maximum(
                    tl.where(label_is_extra, member_label_logit, float("-inf")),
                    tl.where(has_tail, tail_logit, float("-inf")),
                ),
            )
            tail_exp = tl.where(has_tail, tl.exp((tail_logit - target_max) * inv_temperature), 0.0)
            target_lse_t = target_max * inv_temperature + tl.log(
                tl.sum(tl.exp((known_values - target_max) * inv_temperature), axis=0)
                + extra * tl.exp((member_label_logit - target_max) * inv_temperature)
                + tail_count * tail_exp
            )
            tail_p = tl.where(has_tail, tl.exp(tail_logit * inv_temperature - target_lse_t), 0.0)

            z_known = tl.load(student_row + ids, mask=known, other=0.0).to(tl.float32)
            log_p_known = values * inv_temperature - target_lse_t
            log_q_known = z_known * inv_temperature - lse_t
            p_known = tl.exp(log_p_known)
            log_p_label = member_label_logit * inv_temperature - target_lse_t
            log_q_label = z_label * inv_temperature - lse_t
            p_label = tl.exp(log_p_label)
            tail_z_sum = (
                student_sum - tl.sum(tl.where(known, z_known, 0.0), axis=0) - extra * z_label
            )
            kl = (
                tl.sum(tl.where(known, p_known * (log_p_known - log_q_known), 0.0), axis=0)
                + extra * p_label * (log_p_label - log_q_label)
                + tail_p
                * (
                    tail_count * (tail_logit * inv_temperature - target_lse_t + lse_t)
                    - tail_z_sum * inv_temperature
                )
            )
            # The gradient at the known ids, before pass 2 may overwrite the logits.
            grad_known = ce_weight * (
                tl.exp(z_known - lse) - (ids == label).to(tl.float32)
            ) + kd_weight * temperature * (tl.exp(log_q_known) - p_known)
            grad_label = ce_weight * (tl.exp(student_logprob) - 1.0) + kd_weight * temperature * (
                tl.exp(log_q_label) - p_label
            )
        else:
            target_lse_t = target_max * inv_temperature + tl.log(target_sum_exp_t)
            kl = target_cross * inv_temperature / target_sum_exp_t - target_lse_t + lse_t

        # Pass 2: the gradient, already divided for the reduction; zero on ignored rows.
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        kd_coef = tl.where(has_target, kd_weight * temperature, 0.0)
        for start in tl.range(0, num_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < num_classes
            z = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32)
            g = ce_weight * (tl.exp(z - lse) - (cols == label).to(tl.float32))
            if SPARSE:
                g += kd_coef * (tl.exp(z * inv_temperature - lse_t) - tail_p)
            else:
                t = tl.load(target_row + cols, mask=mask & has_target, other=0.0).to(tl.float32)
                g += kd_coef * (
                    tl.exp(z * inv_temperature - lse_t) - tl.exp(t * inv_temperature - target_lse_t)
                )
            g = tl.where(valid, g * scale, 0.0)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        if SPARSE:
            tl.debug_barrier()  # the dense stores above land before the known-id corrections
            tl.store(
                grad_row + ids,
                (grad_known * scale).to(grad_ptr.dtype.element_ty),
                mask=known & has_target,
            )
            tl.store(
                grad_row + label,
                (grad_label * scale).to(grad_ptr.dtype.element_ty),
                mask=has_target & label_is_extra,
            )

        kl = tl.where(has_target, kl, 0.0)
        row_loss = ce_weight * (lse - z_label) + kd_weight * temperature * temperature * kl
        tl.store(row_loss_ptr + row, tl.where(valid, row_loss, 0.0))
        tl.store(chosen_ptr + row, tl.where(has_target, candidate, -1))
        tl.store(kl_ptr + row, kl)
        tl.store(p_student_ptr + row, tl.where(valid, tl.exp(student_logprob), 0.0))
        tl.store(p_teacher_ptr + row, tl.where(valid, tl.exp(teacher_logprob), 0.0))
