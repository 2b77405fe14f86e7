"""Live bidirectional KD for N models trained together: one fused Triton kernel beside its reference.

Per row, with the logits z_1..z_N of N models (any mix of fp32/bf16/fp16) and label y:

* Partition at T = 1 (``fastkd.partition.select_pool_teacher``): the model of highest log p(y)
  teaches every other one. Two models follow Bi-KD exactly (an exact tie goes to B); for N > 2 a
  tie for the best gives the row no KD term.
* Loss = ce_weight * sum_m CE(z_m, y) + kd_weight * T^2 * sum_{m != teacher} KL(p_teacher,T ||
  p_m,T). Ignored rows count for nothing; ``mean`` divides by the number of the other rows.
* ``stop_grad=True`` (default, standard KD): the KL terms send no gradient to the teacher.
  ``stop_grad=False`` reproduces the Bi-KD reference code, where the teacher also gets
  d(T^2 KL(p || q))/dz_t = T * p * (log p - log q - KL) from each learner.

The Triton kernel runs one program per row and takes the N logits as a tuple (each keeps its own
dtype and row stride). Pass 1 reads every row once, keeping per model the online log-sum-exp at
T = 1 and T and, for every ordered pair (t, m), E_{p_t}[(z_t - z_m) / T] (rescaled online), so every
KL(p_t || p_m) is known once the teacher is chosen: no extra pass. Pass 2 reads the rows again and
writes all N gradients (in each model's dtype). The tile along C shrinks with N so that the N tiles
fit in registers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastkd.errors import ConfigError
from fastkd.kernels import common
from fastkd.kernels.common import KDStats
from fastkd.partition import NO_TEACHER, select_pool_teacher

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None


@dataclass(frozen=True)
class BidirectionalKDConfig(common.KDLossConfig):
    """A joint KD loss of N models: whether the teaching model gets the KL's gradient."""

    stop_grad: bool = True


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


def bidirectional_kd_loss(
    logits: Sequence[Tensor], labels: Tensor, **options: Any
) -> tuple[Tensor, KDStats]:
    """Joint KD loss of N >= 2 models' ``logits`` (each [B, C]) on the same rows.

    ``options``: the fields of ``BidirectionalKDConfig`` (temperature, stop_grad, kd_weight,
    ce_weight, ignore_index, reduction, inplace_grad, max_block). Returns the loss summed over the
    models (reduced over rows, or [B] for ``"none"``) and ``KDStats``: chosen = the teaching
    model (-1: none), kl = the row's summed KL, p_teacher = the best p(y), p_student = the most
    confident learner's p(y).
    """
    config = BidirectionalKDConfig(**options)
    if len(logits) < 2:
        raise ConfigError(f"bidirectional KD needs at least 2 models, got {len(logits)}")
    logits = [common.check_logits(z, f"logits[{m}]") for m, z in enumerate(logits)]
    for m, z in enumerate(logits[1:], start=1):
        if z.shape != logits[0].shape or z.device != logits[0].device:
            raise ConfigError(
                f"logits[{m}] is {tuple(z.shape)} on {z.device}, "
                f"logits[0] is {tuple(logits[0].shape)} on {logits[0].device}"
            )
    common.check_labels(labels, logits[0], config.ignore_index)
    if common.triton_backend(_bidirectional_kd_kernel, logits):
        return common.run_function(_BidirectionalKDFunction, labels, config, *logits)
    return bidirectional_kd_reference(logits, labels, config)


class BidirectionalKDLoss(common.KDLossModule):
    """``bidirectional_kd_loss`` as a module: ``loss, stats = criterion([za, zb], labels)``."""

    config_class = BidirectionalKDConfig

    def forward(self, logits: Sequence[Tensor], labels: Tensor) -> tuple[Tensor, KDStats]:
        return bidirectional_kd_loss(logits, labels, **vars(self.config))


class _BidirectionalKDFunction(torch.autograd.Function):
    """Triton forward that writes every model's gradient; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, labels, config, *logits):
        grads = tuple(z if config.inplace_grad else torch.empty_like(z) for z in logits)
        outputs = _launch_bidirectional_kd(logits, grads, labels, config)
        return common.forward_with_gradients(ctx, grads, outputs, labels, config)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        return None, None, *common.scaled_gradients(ctx, grad_loss)


def _launch_bidirectional_kd(
    logits: Sequence[Tensor],
    grads: Sequence[Tensor],
    labels: Tensor,
    config: BidirectionalKDConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_rows, num_classes = logits[0].shape
    num_models = len(logits)
    padded_models = triton.next_power_of_2(num_models)
    cap = config.max_block or max(16, 2 * common.MAX_TILE // padded_models)
    block = common.tile_width(num_classes, cap)
    device = logits[0].device
    row_loss, chosen, kl, p_student, p_teacher = common.stat_buffers(num_rows, device)
    _bidirectional_kd_kernel[(num_rows,)](
        tuple(logits),
        tuple(z.stride(0) for z in logits),
        tuple(grads),
        tuple(g.stride(0) for g in grads),
        labels,
        common.row_scale(labels, config.ignore_index, config.reduction, config.scale),
        row_loss,
        chosen,
        kl,
        p_student,
        p_teacher,
        num_classes,
        *common.kernel_scalars(config),
        NUM_MODELS=num_models,
        STOP_GRAD=config.stop_grad,
        BLOCK_C=block,
        BLOCK_N=max(2, padded_models),
        num_warps=common.num_warps_for(block * padded_models // 2),
    )
    return row_loss, chosen, kl, p_student, p_teacher


if triton is None:  # pragma: no cover
    _bidirectional_kd_kernel = None
else:

    @triton.jit
    def _pick(vector, index, models):
        """The entry ``index`` of a small per-model vector, as a scalar."""
        return tl.sum(tl.where(models == index, vector, 0.0), axis=0)

    @triton.jit
    def _load_tiles(logits, strides, row, cols, mask, NUM_MODELS: tl.constexpr):
        """One fp32 tile of row ``row`` from each model (a tuple: each keeps its own dtype)."""
        tiles = ()
        for m in tl.static_range(NUM_MODELS):
            tile = tl.load(logits[m] + row * strides[m] + cols, mask=mask, other=0.0)
            tiles = tiles + (tile.to(tl.float32),)  # noqa: RUF005 - Triton has no starred tuples
        return tiles

    @triton.jit
    def _bidirectional_kd_kernel(
        logits,
        logit_strides,
        grads,
        grad_strides,
        labels_ptr,
        scale_ptr,
        row_loss_ptr,
        chosen_ptr,
        kl_ptr,
        p_student_ptr,
        p_teacher_ptr,
        num_classes,
        ignore_index,
        inv_temperature,
        temperature,
        kd_weight,
        ce_weight,
        NUM_MODELS: tl.constexpr,
        STOP_GRAD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = label != ignore_index
        label = tl.where(valid, label, 0)
        models = tl.arange(0, BLOCK_N)
        pair_teacher = models[:, None]
        pair_learner = models[None, :]

        # Pass 1, per model: running max, sum exp(z - max), sum exp((z - max) / T); per ordered
        # pair (t, m): sum exp((z_t - max_t) / T) * (z_t - z_m), rescaled with max_t.
        row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
        sum_exp = tl.zeros([BLOCK_N], tl.float32)
        sum_exp_t = tl.zeros([BLOCK_N], tl.float32)
        cross = tl.zeros([BLOCK_N, BLOCK_N], tl.float32)
        for start in tl.range(0, num_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < num_classes
            tiles = _load_tiles(logits, logit_strides, row, cols, mask, NUM_MODELS)
            for t in tl.static_range(NUM_MODELS):
                z = tl.where(mask, tiles[t], float("-inf"))
                old_max = tl.max(tl.where(models == t, row_max, float("-inf")), axis=0)
                new_max = tl.maximum(old_max, tl.max(z, axis=0))
                e_t = tl.exp((z - new_max) * inv_temperature)
                rescale_t = tl.exp((old_max - new_max) * inv_temperature)
                is_t = models == t
                sum_exp = tl.where(
                    is_t,
                    sum_exp * tl.exp(old_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0),
                    sum_exp,
                )
                sum_exp_t = tl.where(is_t, sum_exp_t * rescale_t + tl.sum(e_t, axis=0), sum_exp_t)
                row_max = tl.where(is_t, new_max, row_max)
                cross = tl.where(pair_teacher == t, cross * rescale_t, cross)
                for m in tl.static_range(NUM_MODELS):
                    if m != t:
                        cross += tl.where(
                            (pair_teacher == t) & (pair_learner == m),
                            tl.sum(e_t * (tiles[t] - tiles[m]), axis=0),
                            0.0,
                        )

        in_models = models < NUM_MODELS
        row_max = tl.where(in_models, row_max, 0.0)  # padding: finite, never read
        lse = row_max + tl.log(tl.where(in_models, sum_exp, 1.0))
        lse_t = row_max * inv_temperature + tl.log(tl.where(in_models, sum_exp_t, 1.0))
        z_label = tl.zeros([BLOCK_N], tl.float32)
        for m in tl.static_range(NUM_MODELS):
            logit = tl.load(logits[m] + row * logit_strides[m] + label).to(tl.float32)
            z_label = tl.where(models == m, logit, z_label)
        logprob = tl.where(in_models, z_label - lse, float("-inf"))

        # The partition (fastkd.partition.select_pool_teacher), in registers.
        best_logprob = tl.max(logprob, axis=0)
        first_best = tl.argmax(logprob, axis=0, tie_break_left=True)
        runner_up_logprob = tl.max(tl.where(models == first_best, float("-inf"), logprob), axis=0)
        if NUM_MODELS == 2:
            teacher = tl.where(_pick(logprob, 0, models) > _pick(logprob, 1, models), 0, 1)
        else:
            teacher = tl.where(runner_up_logprob < best_logprob, first_best, -1)
        has_teacher = valid & (teacher >= 0)
        learner = in_models & (models != teacher) & has_teacher

        # KL(p_teacher || p_m) at T for every model m from the pass-1 sums.
        teacher_cross = tl.sum(tl.where(pair_teacher == teacher, cross, 0.0), axis=0)
        teacher_sum_exp_t = tl.where(teacher >= 0, _pick(sum_exp_t, teacher, models), 1.0)
        teacher_lse_t = _pick(lse_t, teacher, models)
        kl = teacher_cross * inv_temperature / teacher_sum_exp_t - teacher_lse_t + lse_t
        kl = tl.where(learner, kl, 0.0)

        # Pass 2: every model's gradient, divided for the reduction; zero on ignored rows.
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        kd_coef = kd_weight * temperature
        for start in tl.range(0, num_classes, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < num_classes
            is_label = (cols == label).to(tl.float32)
            tiles = _load_tiles(logits, logit_strides, row, cols, mask, NUM_MODELS)
            teacher_z = tl.zeros([BLOCK_C], tl.float32)
            for m in tl.static_range(NUM_MODELS):
                teacher_z = tl.where(teacher == m, tiles[m], teacher_z)
            log_p = teacher_z * inv_temperature - teacher_lse_t
            p = tl.exp(log_p)
            teacher_grad = tl.zeros([BLOCK_C], tl.float32)
            grad_tiles = ()
            for m in tl.static_range(NUM_MODELS):
                log_q = tiles[m] * inv_temperature - _pick(lse_t, m, models)
                g = ce_weight * (tl.exp(tiles[m] - _pick(lse, m, models)) - is_label)
                is_learner = has_teacher & (teacher != m)
                g += tl.where(is_learner, kd_coef * (tl.exp(log_q) - p), 0.0)
                if not STOP_GRAD:
                    teacher_grad += tl.where(is_learner, log_p - log_q - _pick(kl, m, models), 0.0)
                grad_tiles = grad_tiles + (g,)  # noqa: RUF005
            for m in tl.static_range(NUM_MODELS):
                g = grad_tiles[m]
                if not STOP_GRAD:
                    g += tl.where(has_teacher & (teacher == m), kd_coef * p * teacher_grad, 0.0)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(
                    grads[m] + row * grad_strides[m] + cols,
                    g.to(grads[m].dtype.element_ty),
                    mask=mask,
                )

        kl_sum = tl.sum(kl, axis=0)
        ce_sum = tl.sum(tl.where(in_models, lse - z_label, 0.0), axis=0)
        row_loss = ce_weight * ce_sum + kd_weight * temperature * temperature * kl_sum
        tl.store(row_loss_ptr + row, tl.where(valid, row_loss, 0.0))
        tl.store(chosen_ptr + row, tl.where(valid, teacher, -1).to(tl.int64))
        tl.store(kl_ptr + row, kl_sum)
        tl.store(p_student_ptr + row, tl.where(valid, tl.exp(runner_up_logprob), 0.0))
        tl.store(p_teacher_ptr + row, tl.where(valid, tl.exp(best_logprob), 0.0))
