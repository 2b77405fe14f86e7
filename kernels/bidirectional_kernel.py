"""Live bidirectional KD for N models trained together: the fused Triton kernel and its launcher.

The rule per row (the partition, the loss, ``stop_grad``) is defined by the torch reference
beside it, ``kernels.bidirectional_reference``; the config and the public loss are in
``kernels.bidirectional_kd``.

The Triton kernel runs rows p, p + G, ... in program p of G (``kernels.row_grid``, as the
partitioned kernel, with every model's row in a row's bytes) and takes the N logits as a tuple
(each keeps its own dtype and row stride). Rows are cut as in the partitioned kernel (a masked head to model 0's
16-byte boundary, unmasked whole tiles, a masked tail) when every row shares that phase. Pass 1
reads every row once, keeping per model the online log-sum-exp at T = 1 and T (one exp2 per
element at T = 1); without stop_grad also, for every ordered pair (t, m), E_{p_t}[(z_t - z_m) / T]
(rescaled online, no extra exp), since the teacher's gradient needs every KL before pass 2.
Pass 2 reads the rows again, last tile first, computes each model's q (one exp2 per element at
T = 1; the teacher's own q at T is its target p), writes all N gradients (in each model's dtype)
and, with stop_grad, sums each learner's KL on the way. Two exps per model element at T = 1. The
tile along C shrinks with N so that the N tiles fit in registers (``TILES``); the whole-tile
loops are software-pipelined (``num_stages``: asynchronous copies of the next tiles in flight).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from fastkd.kernels import common, row_grid
from fastkd.kernels.launch import launch
from fastkd.kernels.tiling import TileRule, pick_tiling

if TYPE_CHECKING:  # a type hint only: the config's module imports this one
    from fastkd.kernels.bidirectional_kd import BidirectionalKDConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None


TILES: dict[int, tuple[TileRule, ...]] = {
    2: ((8, 4096, 8, 3, 128),),
    4: ((8, 1024, 4, 3, 255),),
}
"""Tiles by the model count (padded to a power of two) and the widest element: two models,
4 KB of each row a tile at 8 warps (2048 bf16 columns a model, 1024 fp32), at most 128
registers; three or four, 1 KB at 4 warps (the widest that compiles without a spill for every
C; ``fastkd bench compile``), at most 255 registers (two blocks per SM: with the row loop, four
models spilled 4-36 bytes at 168, the most for three blocks); three stages (two tiles of every
model in flight as asynchronous copies)."""


def launch_bidirectional_kd(
    logits: Sequence[Tensor],
    grads: Sequence[Tensor],
    labels: Tensor,
    config: BidirectionalKDConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the kernel: fills ``grads`` and returns row losses and the four per-row stats."""
    num_rows, num_classes = logits[0].shape
    num_models = len(logits)
    padded_models = triton.next_power_of_2(num_models)
    widest = max(z.element_size() for z in (*logits, *grads))
    tiling = pick_tiling(TILES[padded_models], num_classes, widest, config.max_block)
    stats, chosen = common.stat_buffers(num_rows, logits[0].device)
    vec = min(common.vector_width(z) for z in logits)
    aligned = all(
        common.aligned_width(t, logits[0], vec, (t.stride(0),)) == vec for t in (*logits, *grads)
    )
    row_bytes = num_classes * sum(z.element_size() for z in logits)
    launch(
        _bidirectional_kd_kernel,
        (row_grid.row_programs(num_rows, row_bytes, tiling, logits[0].device),),
        tuple(logits),
        tuple(z.stride(0) for z in logits),
        tuple(grads),
        tuple(g.stride(0) for g in grads),
        labels,
        common.row_scale(labels, config.ignore_index, config.reduction, config.scale),
        stats,
        chosen,
        num_rows,
        num_classes,
        *common.kernel_scalars(config),
        NUM_MODELS=num_models,
        STOP_GRAD=config.stop_grad,
        TEMPERATURE=common.temperature_code(config.temperature),
        BLOCK_C=tiling.block,
        BLOCK_N=max(2, padded_models),
        VEC=vec if aligned else 1,
        STAGES=tiling.stages,
        num_warps=tiling.num_warps,
        maxnreg=tiling.max_registers,
    )
    return common.row_outputs(stats, chosen)


if triton is None:  # pragma: no cover
    _bidirectional_kd_kernel = None
else:
    from fastkd.kernels.common import (
        LN2,
        LOG2E,
        STREAM,
        T_HALF,
        T_UNIT,
        split_row,
        store_row_stats,
    )

    @triton.jit
    def _pick(vector, index, models):
        """The entry ``index`` of a small per-model vector, as a scalar."""
        return tl.sum(tl.where(models == index, vector, 0.0), axis=0)

    @triton.jit
    def _load_tiles(
        logits, offsets, cols, mask, other, NUM_MODELS: tl.constexpr, MASKED: tl.constexpr
    ):
        """One fp32 tile from each model's row (a tuple: each keeps its own dtype). Unmasked
        tiles start at each row's 16-byte phase (``offsets`` carry the hint)."""
        tiles = ()
        for m in tl.static_range(NUM_MODELS):
            if MASKED:
                tile = tl.load(logits[m] + offsets[m] + cols, mask=mask, other=other)
            else:
                tile = tl.load(logits[m] + offsets[m] + cols)
            tiles = tiles + (tile.to(tl.float32),)  # noqa: RUF005 - Triton has no starred tuples
        return tiles

    @triton.jit
    def _row_offsets(strides, row, start, VEC: tl.constexpr, NUM_MODELS: tl.constexpr):
        """Each model's element offset of column ``start`` of ``row`` (a multiple of VEC there)."""
        offsets = ()
        for m in tl.static_range(NUM_MODELS):
            offsets = offsets + (tl.multiple_of(row * strides[m] + start, VEC),)  # noqa: RUF005
        return offsets

    @triton.jit
    def _stats_tile(
        tiles, mask, models, row_max, sum_exp, sum_exp_t, cross, inv_temperature,
        NUM_MODELS: tl.constexpr, STOP_GRAD: tl.constexpr, TEMPERATURE: tl.constexpr,
        MASKED: tl.constexpr,
    ):  # fmt: skip
        """Pass 1 on one tile, per model (log2 units): running max, sum exp at T = 1 and at T;
        without stop_grad, per ordered pair (t, m) the rescaled sum exp(z_t / T) (z_t - z_m)."""
        pair_teacher = models[:, None]
        pair_learner = models[None, :]
        for t in tl.static_range(NUM_MODELS):
            z = tiles[t]
            if MASKED:
                z = tl.where(mask, z, float("-inf"))
            u = z * LOG2E
            is_t = models == t
            old_max = tl.max(tl.where(is_t, row_max, float("-inf")), axis=0)
            new_max = tl.maximum(old_max, tl.max(u, axis=0))
            if TEMPERATURE == T_UNIT:
                e_t = tl.exp2(u - new_max)
                e1 = e_t
                rescale_t = tl.exp2(old_max - new_max)
                rescale1 = rescale_t
            elif TEMPERATURE == T_HALF:
                e_t = tl.exp2((u - new_max) * 0.5)
                e1 = e_t * e_t
                rescale_t = tl.exp2((old_max - new_max) * 0.5)
                rescale1 = rescale_t * rescale_t
            else:
                e_t = tl.exp2((u - new_max) * inv_temperature)
                e1 = tl.exp2(u - new_max)
                rescale_t = tl.exp2((old_max - new_max) * inv_temperature)
                rescale1 = tl.exp2(old_max - new_max)
            sum_exp = tl.where(is_t, sum_exp * rescale1 + tl.sum(e1, axis=0), sum_exp)
            sum_exp_t = tl.where(is_t, sum_exp_t * rescale_t + tl.sum(e_t, axis=0), sum_exp_t)
            row_max = tl.where(is_t, new_max, row_max)
            if not STOP_GRAD:
                cross = tl.where(pair_teacher == t, cross * rescale_t, cross)
                for m in tl.static_range(NUM_MODELS):
                    if m != t:
                        difference = tiles[t] - tiles[m]
                        if MASKED:
                            difference = tl.where(mask, difference, 0.0)
                        cross += tl.where(
                            (pair_teacher == t) & (pair_learner == m),
                            tl.sum(e_t * difference, axis=0),
                            0.0,
                        )
        return row_max, sum_exp, sum_exp_t, cross

    @triton.jit
    def _gradient_tiles(
        tiles, grads, grad_offsets, lanes, cols, mask, label, models, lse1, lse_t, teacher,
        teacher_lse_t, has_teacher, kl, kd_coef, ce_coef, inv_temperature, learner_cross,
        NUM_MODELS: tl.constexpr, STOP_GRAD: tl.constexpr, TEMPERATURE: tl.constexpr,
        MASKED: tl.constexpr,
    ):  # fmt: skip
        """Pass 2 on one tile: every model's gradient; each learner's sum p (z_t - z_m).
        ``lanes`` address the tile from ``grad_offsets``; ``cols`` are its columns."""
        is_label = (cols == label).to(tl.float32)
        q1s = ()
        q_ts = ()
        teacher_z = tl.zeros_like(tiles[0])
        teacher_q = tl.zeros_like(tiles[0])
        for m in tl.static_range(NUM_MODELS):
            u = tiles[m] * LOG2E
            if TEMPERATURE == T_UNIT:
                q1 = tl.exp2(u - _pick(lse1, m, models))
                q_t = q1
            elif TEMPERATURE == T_HALF:
                q_t = tl.exp2(u * 0.5 - _pick(lse_t, m, models))
                q1 = q_t * q_t * tl.exp2(2.0 * _pick(lse_t, m, models) - _pick(lse1, m, models))
            else:
                q1 = tl.exp2(u - _pick(lse1, m, models))
                q_t = tl.exp2(u * inv_temperature - _pick(lse_t, m, models))
            q1s = q1s + (q1,)  # noqa: RUF005
            q_ts = q_ts + (q_t,)  # noqa: RUF005
            teacher_z = tl.where(teacher == m, tiles[m], teacher_z)
            teacher_q = tl.where(teacher == m, q_t, teacher_q)
        p = tl.where(has_teacher, teacher_q, 0.0)  # the teacher's own distribution at T
        if MASKED:
            p = tl.where(mask, p, 0.0)
        teacher_grad = tl.zeros_like(tiles[0])
        grad_tiles = ()
        for m in tl.static_range(NUM_MODELS):
            is_learner = has_teacher & (teacher != m)
            g = ce_coef * (q1s[m] - is_label)
            g += tl.where(is_learner, kd_coef * (q_ts[m] - p), 0.0)
            difference = teacher_z - tiles[m]
            if MASKED:
                difference = tl.where(mask, difference, 0.0)
            learner_cross += tl.where(models == m, tl.sum(p * difference, axis=0), 0.0)
            if not STOP_GRAD:
                # d(T^2 KL(p || q_m)) / dz_t = T p (log p - log q_m - KL_m), log p - log q_m =
                # (z_t - z_m) / T - lse_t,teacher + lse_t,m.
                log_ratio = (
                    difference * inv_temperature + (_pick(lse_t, m, models) - teacher_lse_t) * LN2
                )
                teacher_grad += tl.where(is_learner, log_ratio - _pick(kl, m, models), 0.0)
            grad_tiles = grad_tiles + (g,)  # noqa: RUF005
        for m in tl.static_range(NUM_MODELS):
            g = grad_tiles[m]
            if not STOP_GRAD:
                g += tl.where(has_teacher & (teacher == m), kd_coef * p * teacher_grad, 0.0)
            pointer = grads[m] + grad_offsets[m] + lanes
            g = g.to(grads[m].dtype.element_ty)
            if MASKED:
                tl.store(pointer, g, mask=mask, eviction_policy=STREAM)  # not read again here
            else:
                tl.store(pointer, g, eviction_policy=STREAM)
        return learner_cross

    # Not specialised on shapes and strides (see the partitioned kernel).
    @triton.jit(
        do_not_specialize=["logit_strides", "grad_strides", "num_rows", "num_classes", "ignore_index"]
    )
    def _bidirectional_kd_kernel(
        logits,
        logit_strides,
        grads,
        grad_strides,
        labels_ptr,
        scale_ptr,
        stats_ptr,
        chosen_ptr,
        num_rows,
        num_classes,
        ignore_index,
        inv_temperature,
        temperature,
        kd_weight,
        ce_weight,
        NUM_MODELS: tl.constexpr,
        STOP_GRAD: tl.constexpr,
        TEMPERATURE: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
        VEC: tl.constexpr,  # elements per 16 bytes when every row shares model 0's phase, else 1
        STAGES: tl.constexpr,  # software-pipeline stages of the whole-tile loops
    ):
        # Rows p, p + G, ... (G programs: kernels.row_grid); int64 offsets.
        for row in tl.range(tl.program_id(0).to(tl.int64), num_rows, tl.num_programs(0)):
            label = tl.load(labels_ptr + row).to(tl.int64)
            valid = label != ignore_index
            label = tl.where(valid, label, 0)
            models = tl.arange(0, BLOCK_N)
            in_models = models < NUM_MODELS
            row_offsets = _row_offsets(logit_strides, row, 0, 1, NUM_MODELS)
            grad_row_offsets = _row_offsets(grad_strides, row, 0, 1, NUM_MODELS)

            # Columns: a head up to model 0's first 16-byte boundary, whole tiles without masks,
            # a masked tail (every model's row shares that phase, or VEC is 1).
            head, full_tiles, tail_start = split_row(row * logit_strides[0], num_classes, VEC, BLOCK_C)
            lanes = tl.arange(0, BLOCK_C)
            head_mask = lanes < head
            tail_cols = tail_start + lanes
            tail_mask = tail_cols < num_classes

            # Pass 1: every model's log-sum-exps (and, without stop_grad, the pairs' cross terms).
            row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
            sum_exp = tl.zeros([BLOCK_N], tl.float32)
            sum_exp_t = tl.zeros([BLOCK_N], tl.float32)
            cross = tl.zeros([BLOCK_N, BLOCK_N], tl.float32)
            if head > 0:
                tiles = _load_tiles(logits, row_offsets, lanes, head_mask, 0.0, NUM_MODELS, True)
                row_max, sum_exp, sum_exp_t, cross = _stats_tile(
                    tiles, head_mask, models, row_max, sum_exp, sum_exp_t, cross, inv_temperature,
                    NUM_MODELS, STOP_GRAD, TEMPERATURE, True,
                )  # fmt: skip
            for tile in tl.range(0, full_tiles, num_stages=STAGES):
                start = head + tile * BLOCK_C
                offsets = _row_offsets(logit_strides, row, start, VEC, NUM_MODELS)
                tiles = _load_tiles(logits, offsets, lanes, None, 0.0, NUM_MODELS, False)
                row_max, sum_exp, sum_exp_t, cross = _stats_tile(
                    tiles, None, models, row_max, sum_exp, sum_exp_t, cross, inv_temperature,
                    NUM_MODELS, STOP_GRAD, TEMPERATURE, False,
                )  # fmt: skip
            if tail_start < num_classes:
                tiles = _load_tiles(logits, row_offsets, tail_cols, tail_mask, 0.0, NUM_MODELS, True)
                row_max, sum_exp, sum_exp_t, cross = _stats_tile(
                    tiles, tail_mask, models, row_max, sum_exp, sum_exp_t, cross, inv_temperature,
                    NUM_MODELS, STOP_GRAD, TEMPERATURE, True,
                )  # fmt: skip

            row_max = tl.where(in_models, row_max, 0.0)  # padding: finite, never read
            lse1 = row_max + tl.log2(tl.where(in_models, sum_exp, 1.0))  # log2 units of z
            if TEMPERATURE == T_UNIT:
                lse_t = lse1
            else:
                lse_t = row_max * inv_temperature + tl.log2(tl.where(in_models, sum_exp_t, 1.0))
            lse = lse1 * LN2
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
            teacher_lse_t = _pick(lse_t, teacher, models)

            # Without stop_grad the teacher's gradient needs every KL(p_teacher || q_m) before pass
            # 2: from pass 1's cross terms. With it, pass 2 sums the KLs' terms on the way.
            kl = tl.zeros([BLOCK_N], tl.float32)
            if not STOP_GRAD:
                teacher_cross = tl.sum(tl.where(models[:, None] == teacher, cross, 0.0), axis=0)
                teacher_sum_exp_t = tl.where(teacher >= 0, _pick(sum_exp_t, teacher, models), 1.0)
                kl = teacher_cross * inv_temperature / teacher_sum_exp_t + (lse_t - teacher_lse_t) * LN2
                kl = tl.where(learner, kl, 0.0)

            # Pass 2, last whole tile first, then the masked ends: every model's gradient, scaled
            # for the reduction; zero on ignored rows.
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            kd_coef = kd_weight * temperature * scale
            ce_coef = ce_weight * scale
            learner_cross = tl.zeros([BLOCK_N], tl.float32)
            for tile in tl.range(0, full_tiles, num_stages=STAGES):
                start = head + (full_tiles - 1 - tile) * BLOCK_C
                offsets = _row_offsets(logit_strides, row, start, VEC, NUM_MODELS)
                grad_offsets = _row_offsets(grad_strides, row, start, VEC, NUM_MODELS)
                tiles = _load_tiles(logits, offsets, lanes, None, 0.0, NUM_MODELS, False)
                learner_cross = _gradient_tiles(
                    tiles, grads, grad_offsets, lanes, start + lanes, None, label, models, lse1, lse_t,
                    teacher, teacher_lse_t, has_teacher, kl, kd_coef, ce_coef, inv_temperature,
                    learner_cross, NUM_MODELS, STOP_GRAD, TEMPERATURE, False,
                )  # fmt: skip
            for part in tl.static_range(2):  # the masked tail, then the masked head
                start = tail_start if part == 0 else 0
                limit = num_classes if part == 0 else head
                if start < limit:
                    cols = start + lanes
                    mask = cols < limit
                    tiles = _load_tiles(logits, row_offsets, cols, mask, 0.0, NUM_MODELS, True)
                    learner_cross = _gradient_tiles(
                        tiles, grads, grad_row_offsets, cols, cols, mask, label, models, lse1, lse_t,
                        teacher, teacher_lse_t, has_teacher, kl, kd_coef, ce_coef, inv_temperature,
                        learner_cross, NUM_MODELS, STOP_GRAD, TEMPERATURE, True,
                    )  # fmt: skip
            if STOP_GRAD:
                # KL(p || q_m) = sum p (z_t - z_m) / T - lse_t,teacher + lse_t,m (p sums to 1).
                kl = learner_cross * inv_temperature + (lse_t - teacher_lse_t) * LN2
                kl = tl.where(learner, kl, 0.0)

            kl_sum = tl.sum(kl, axis=0)
            ce_sum = tl.sum(tl.where(in_models, lse - z_label, 0.0), axis=0)
            row_loss = ce_weight * ce_sum + kd_weight * temperature * temperature * kl_sum
            store_row_stats(
                stats_ptr, chosen_ptr, row, tl.where(valid, row_loss, 0.0),
                tl.where(valid, teacher, -1), kl_sum, tl.where(valid, tl.exp(runner_up_logprob), 0.0),
                tl.where(valid, tl.exp(best_logprob), 0.0),
            )  # fmt: skip
