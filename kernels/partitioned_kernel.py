"""Partitioned KD against stored pool targets: the fused Triton kernel and its launcher.

The rule per row (the partition modes and scores, the loss, the targets) is defined by the torch
reference beside it, ``kernels.partitioned_reference``; ``plain`` reaches the kernel as the
teachers' mixture, one column read as ``best`` (``plain_as_best``). The config and the public
loss are in ``kernels.partitioned_kd``; the work on one tile of a pass in
``kernels.partitioned_tiles``, a sparse target's terms in ``kernels.sparse_target``.

The Triton kernel is built for the bandwidth bound (docs/design.md has the bytes and exps per
row). Program p of G runs rows p, p + G, ... (``kernels.row_grid`` picks G: the GPU filled,
several rows a program, at small C; at long C no more programs than rows whose bytes fit in
L2, so pass 2's re-read hits there; not measured on a GPU yet). Each row is cut at the
student's first 16-byte boundary: a masked head, whole tiles read without masks (16-byte loads; the gradient, and a dense teacher whose rows
keep the same phase, too: ``common.aligned_width``), a masked tail. The whole-tile loops are
software-pipelined (``num_stages``: the next tiles' asynchronous copies are in flight while one
is computed), with tiles, warps and stages from a table by the student's element
(``DENSE_TILES``, ``SPARSE_TILES``). Pass 1 reads only the student: its online log-sum-exps at
T = 1 and T in base 2 (one exp2 per element; at T = 2 one exp2 serves both); a dense teacher
is read in pass 1 only at T != 1 when its log-sum-exp at T does not come with the targets
(``PoolTargets.logprobs_lse``, made where the rows are read; at T = 1 its stored
log-probabilities are used as they are); the uniform tail adds the
student's row sum, which gives the tail's sum of log q. Pass 2 runs the
tiles last-first, so the student's re-read is likeliest to hit in cache, reads the teacher once,
writes the gradient (streamed out: evict_first) ce_weight * (softmax(z) - onehot(y)) +
kd_weight * T * (q_T - p_T) and sums
the KL on the way (two exps per element at T = 1: three a row element in all). For sparse
targets pass 2 writes the tail's gradient (kd T (a q_T - b): uniform a = 1, b = P_T / n;
bucket a = 1 - P_T / Q_T, b = 0; sampled a = 1, b = 0), then the known ids and the drawn ids are
corrected by a scatter (gathered before pass 2, so ``inplace_grad=True`` may overwrite the
logits). No B x C fp32 temporary is made (but by ``plain`` with several teachers: their
mixture); offsets are int64; shapes and strides are not specialised on, so one compiled kernel serves every C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from fastkd.choices import PartitionMode, PartitionScore
from fastkd.compression import TailModel
from fastkd.errors import ConfigError
from fastkd.kernels import common, row_grid
from fastkd.kernels.launch import launch
from fastkd.kernels.targets import PoolTargets
from fastkd.kernels.tiling import TileRule, pick_tiling

if TYPE_CHECKING:  # a type hint only: the config's module imports this one
    from fastkd.kernels.partitioned_kd import PartitionedKDConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

_MODE_CODE = {PartitionMode.LIVE: 0, PartitionMode.FIXED: 1, PartitionMode.BEST: 2}


def _mode_code(mode: PartitionMode) -> int:
    """The kernel's MODE; ``plain`` reaches it only as ``plain_as_best``'s one-column ``best``."""
    if mode not in _MODE_CODE:
        raise ConfigError(f"the kernel runs {mode.value!r} only after plain_as_best (one column)")
    return _MODE_CODE[mode]


DENSE_TILES: tuple[TileRule, ...] = ((8, 4096, 8, 3, 128),)
"""Dense teachers, by the student's element: 4 KB of its row a tile at 8 warps, one 16-byte
vector a thread (2048 bf16 / fp16 columns, 1024 fp32; an fp32 teacher under a bf16 student is
read as two; with the row loop, 4096 bf16 columns spilled 116-220 bytes, and 2048 fp32 ones
24-40), three stages (two tiles in flight as asynchronous copies), at most 128 registers (two
blocks per SM)."""
SPARSE_TILES: tuple[TileRule, ...] = ((2, 2048, 4, 4, None), (8, 4096, 4, 4, 128))
"""Top-k teachers: 1024-wide tiles at 4 warps (8 elements a thread). The student's row is then
the only B x C read, and more resident programs hide its latency better than wider tiles
(``bench/results/kernel-sweep-h200.json``: 2048 columns at 8 warps took 1.3x as long); four
stages (three small tiles in flight); no register cap for bf16 / fp16 students (with one of
128, ptxas took 99 registers where it takes 48 alone), 128 for fp32 ones (with the row loop,
ptxas alone took 72 and spilled 4 bytes on sm_80, at 96 it spilled 4-8 on sm_90; four blocks
per SM)."""
_TAIL_CODE = {TailModel.UNIFORM: 0, TailModel.BUCKET: 1, TailModel.SAMPLED: 2}  # sparse_target's


def launch_partitioned_kd(
    student_logits: Tensor,
    grad: Tensor,
    labels: Tensor,
    targets: PoolTargets,
    config: PartitionedKDConfig,
    scores: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the kernel: fills ``grad`` and returns row losses and the four per-row stats.

    ``scores``: the members' partition scores [B, M] (default: ``targets.partition_scores`` of
    the config's score). ``plain`` must already be ``plain_as_best``'s mixture."""
    num_rows, num_classes = student_logits.shape
    true_logprob = targets.true_logprob.float().contiguous()
    confidence = config.partition_score is PartitionScore.CONFIDENCE
    if scores is None:
        scores = targets.partition_scores(config.partition_score) if confidence else true_logprob
    scores = scores.float().contiguous()
    if targets.is_sparse:
        target_values = common.unit_last_stride(targets.topk_logprobs)
        target_ids = common.unit_last_stride(targets.topk_ids)
        ids_strides = target_ids.stride()[:2]
        log_tail = targets.log_tail.float().contiguous()
        log_tail_sqrt = targets.log_tail_sqrt.float().contiguous()
    else:
        target_values = common.unit_last_stride(targets.logprobs)
        target_ids = log_tail = log_tail_sqrt = true_logprob  # unused when dense: valid pointers
        ids_strides = (0, 0)
    if targets.tail_ids is not None:
        tail_ids = common.unit_last_stride(targets.tail_ids)
        tail_strides = tail_ids.stride()[:2]
    else:
        tail_ids, tail_strides = true_logprob, (0, 0)
    stats, chosen = common.stat_buffers(num_rows, student_logits.device)
    tiling = pick_tiling(
        SPARSE_TILES if targets.is_sparse else DENSE_TILES,
        num_classes,
        student_logits.element_size(),
        config.max_block,
    )
    # A dense teacher's log-sum-exp at T, computed outside the kernel at this T: pass 1 then
    # reads only the student (PoolTargets.with_lse).
    teacher_lse = (
        not targets.is_sparse
        and config.temperature != 1.0
        and targets.logprobs_lse is not None
        and targets.lse_temperature == config.temperature
    )
    lse = targets.logprobs_lse.float().contiguous() if teacher_lse else true_logprob
    vec = common.vector_width(student_logits)
    row_stride, member_stride = target_values.stride()[:2]
    row_bytes = num_classes * (
        student_logits.element_size() + (0 if targets.is_sparse else target_values.element_size())
    )
    launch(
        _partitioned_kd_kernel,
        (row_grid.row_programs(num_rows, row_bytes, tiling, student_logits.device),),
        student_logits,
        student_logits.stride(0),
        grad,
        grad.stride(0),
        labels,
        scores,
        true_logprob,
        log_tail,
        log_tail_sqrt,
        lse,
        true_logprob.stride(0),
        target_values,
        row_stride,
        member_stride,
        target_ids,
        ids_strides[0],
        ids_strides[1],
        tail_ids,
        tail_strides[0],
        tail_strides[1],
        common.row_scale(labels, config.ignore_index, config.reduction, config.scale),
        stats,
        chosen,
        num_rows,
        num_classes,
        targets.num_members,
        targets.topk,
        targets.tail_samples,
        -1 if config.self_index is None else config.self_index,
        *common.kernel_scalars(config),
        MODE=_mode_code(config.mode),
        CONFIDENCE=confidence,
        SPARSE=targets.is_sparse,
        TAIL=_TAIL_CODE[targets.tail],
        TEMPERATURE=common.temperature_code(config.temperature),
        TEACHER_LSE=teacher_lse,
        BLOCK_C=tiling.block,
        BLOCK_M=max(2, triton.next_power_of_2(targets.num_members)),
        BLOCK_K=max(2, triton.next_power_of_2(targets.topk)),
        BLOCK_S=max(2, triton.next_power_of_2(targets.tail_samples)),
        VEC=vec,
        GRAD_VEC=common.aligned_width(grad, student_logits, vec, (grad.stride(0),)),
        TEACHER_VEC=1
        if targets.is_sparse
        else common.aligned_width(target_values, student_logits, vec, (row_stride, member_stride)),
        STAGES=tiling.stages,
        num_warps=tiling.num_warps,
        maxnreg=tiling.max_registers,
    )
    return common.row_outputs(stats, chosen)


if triton is None:  # pragma: no cover
    _partitioned_kd_kernel = None
else:
    from fastkd.kernels.common import LN2, LOG2E, T_UNIT, split_row, store_row_stats
    from fastkd.kernels.partitioned_tiles import gradient_tile, pass1_part
    from fastkd.kernels.sparse_target import (
        TAIL_BUCKET,
        TAIL_SAMPLED,
        TAIL_UNIFORM,
        correct_drawn_gradient,
        sparse_target_terms,
    )

    # Shapes and strides are not specialised on (the head / whole-tile split and the VEC
    # constexprs carry the alignment): one compiled kernel serves every vocabulary size.
    @triton.jit(
        do_not_specialize=[
            "student_stride", "grad_stride", "pool_row_stride", "target_row_stride",
            "target_member_stride", "ids_row_stride", "ids_member_stride", "draws_row_stride",
            "draws_member_stride", "num_rows", "num_classes", "num_members", "topk", "tail_samples",
            "self_index", "ignore_index",
        ]
    )  # fmt: skip
    def _partitioned_kd_kernel(
        student_ptr,
        student_stride,
        grad_ptr,
        grad_stride,
        labels_ptr,
        score_ptr,  # [B, M] partition scores, and the three below: contiguous, row stride
        true_logprob_ptr,  # pool_row_stride (the sparse terms read the chosen member's p(y))
        log_tail_ptr,
        log_tail_sqrt_ptr,
        target_lse_ptr,  # a dense teacher's natural log-sum-exp of logprobs / T (TEACHER_LSE)
        pool_row_stride,
        target_ptr,
        target_row_stride,
        target_member_stride,
        ids_ptr,
        ids_row_stride,
        ids_member_stride,
        draws_ptr,
        draws_row_stride,
        draws_member_stride,
        scale_ptr,
        stats_ptr,
        chosen_ptr,
        num_rows,
        num_classes,
        num_members,
        topk,
        tail_samples,
        self_index,
        ignore_index,
        inv_temperature,
        temperature,
        kd_weight,
        ce_weight,
        MODE: tl.constexpr,  # 0 live, 1 fixed, 2 best (plain: best on the teachers' mixture)
        CONFIDENCE: tl.constexpr,  # the scores are max_c log p(c): the student's is its own
        SPARSE: tl.constexpr,
        TAIL: tl.constexpr,  # sparse_target.TAIL_UNIFORM, TAIL_BUCKET or TAIL_SAMPLED
        TEMPERATURE: tl.constexpr,  # T_UNIT, T_HALF or any other T
        TEACHER_LSE: tl.constexpr,  # dense, T != 1: the teacher's lse at T is given, not summed
        BLOCK_C: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
        VEC: tl.constexpr,  # student elements per 16 bytes (1: no vector loads); whole tiles
        # start at the student's 16-byte boundaries (common.aligned_width)
        GRAD_VEC: tl.constexpr,  # the gradient's alignment in its elements there (1: none)
        TEACHER_VEC: tl.constexpr,  # a dense teacher's alignment in its elements there (1: none)
        STAGES: tl.constexpr,  # software-pipeline stages of the whole-tile loops
    ):
        SUM_Z: tl.constexpr = SPARSE and TAIL == TAIL_UNIFORM
        SUM_REST: tl.constexpr = SPARSE and TAIL == TAIL_BUCKET
        # Pass 1 reads a dense teacher only at T != 1 and only when its lse at T is not given.
        READ_TEACHER: tl.constexpr = not SPARSE and TEMPERATURE != T_UNIT and not TEACHER_LSE
        # Rows p, p + G, ... (G programs: kernels.row_grid); int64 offsets.
        for row in tl.range(tl.program_id(0).to(tl.int64), num_rows, tl.num_programs(0)):
            label = tl.load(labels_ptr + row).to(tl.int64)
            valid = label != ignore_index
            label = tl.where(valid, label, 0)
            student_offset = row * student_stride
            grad_offset = row * grad_stride

            # The partition's candidate, from stored scores only (T = 1, first of equal best).
            members = tl.arange(0, BLOCK_M)
            in_pool = members < num_members
            pool_score = tl.load(score_ptr + row * pool_row_stride + members, mask=in_pool)
            teachers_score = tl.where(in_pool & (members != self_index), pool_score, float("-inf"))
            teacher = tl.argmax(teachers_score, axis=0, tie_break_left=True)
            teacher_score = tl.max(teachers_score, axis=0)
            if MODE == 1:
                self_score = tl.sum(tl.where(members == self_index, pool_score, 0.0), axis=0)
                candidate = tl.where(teacher_score > self_score, teacher, self_index)
            else:
                candidate = teacher
            candidate = candidate.to(tl.int64)
            target_offset = row * target_row_stride + candidate * target_member_stride
            member_offset = row * pool_row_stride + candidate

            # Columns: a head to the student's first 16-byte boundary, whole tiles read without
            # masks (16-byte loads), a masked tail.
            head, full_tiles, tail_start = split_row(student_offset, num_classes, VEC, BLOCK_C)
            lanes = tl.arange(0, BLOCK_C)
            head_mask = lanes < head
            tail_cols = tail_start + lanes
            tail_mask = tail_cols < num_classes

            # Pass 1: the student's log-sum-exps (and a dense teacher's at T != 1; at T = 1 its
            # stored log-probabilities are used as they are and it is not read here).
            m = float("-inf")
            s1 = 0.0
            s_t = 0.0
            rest = 0.0
            z_sum = 0.0
            tm = float("-inf")
            ts = 0.0
            if head > 0:
                m, s1, s_t, rest, z_sum, tm, ts = pass1_part(
                    student_ptr + student_offset, target_ptr + target_offset, lanes, head_mask,
                    m, s1, s_t, rest, z_sum, tm, ts, inv_temperature, TEMPERATURE, READ_TEACHER,
                    SUM_Z, SUM_REST, True,
                )  # fmt: skip
            for tile in tl.range(0, full_tiles, num_stages=STAGES):
                start = head + tile * BLOCK_C
                m, s1, s_t, rest, z_sum, tm, ts = pass1_part(
                    student_ptr + tl.multiple_of(student_offset + start, VEC),
                    target_ptr + tl.multiple_of(target_offset + start, TEACHER_VEC), lanes, None,
                    m, s1, s_t, rest, z_sum, tm, ts, inv_temperature, TEMPERATURE, READ_TEACHER,
                    SUM_Z, SUM_REST, False,
                )  # fmt: skip
            if tail_start < num_classes:
                m, s1, s_t, rest, z_sum, tm, ts = pass1_part(
                    student_ptr + student_offset, target_ptr + target_offset, tail_cols, tail_mask,
                    m, s1, s_t, rest, z_sum, tm, ts, inv_temperature, TEMPERATURE, READ_TEACHER,
                    SUM_Z, SUM_REST, True,
                )  # fmt: skip

            # Row statistics (log2 units for the passes, natural units for the loss).
            lse1 = m + tl.log2(s1)
            lse_t = lse1 if TEMPERATURE == T_UNIT else m * inv_temperature + tl.log2(s_t)
            lse = lse1 * LN2
            z_label = tl.load(student_ptr + student_offset + label, mask=valid, other=0.0).to(
                tl.float32
            )
            student_logprob = z_label - lse
            # The student's score: log q(y), or max_c log q(c) = (max - lse1) ln 2 from pass 1's
            # base-2 sums (s1 is the sum of exp2(u - max)).
            student_score = -tl.log2(s1) * LN2 if CONFIDENCE else student_logprob
            has_target = valid
            if MODE == 0:
                has_target = has_target & (teacher_score > student_score)

            tail_scale = 1.0
            tail_p = 0.0
            target_lse_t = 0.0
            if SPARSE:
                (
                    kl, tail_scale, tail_p, tail_total, ids, known, grad_known, label_is_extra,
                    grad_label, draws,
                ) = sparse_target_terms(
                    student_ptr + student_offset,
                    ids_ptr + row * ids_row_stride + candidate * ids_member_stride,
                    target_ptr + target_offset,
                    draws_ptr + row * draws_row_stride + candidate * draws_member_stride,
                    label, tl.load(true_logprob_ptr + member_offset),
                    tl.load(log_tail_ptr + member_offset), tl.load(log_tail_sqrt_ptr + member_offset),
                    z_label, z_sum, lse, lse_t * LN2, m, s1 if TEMPERATURE == T_UNIT else s_t, rest,
                    num_classes, topk, tail_samples,
                    inv_temperature, temperature, kd_weight, ce_weight,
                    TAIL, TEMPERATURE, BLOCK_K, BLOCK_S,
                )  # fmt: skip
            elif TEACHER_LSE:
                target_lse_t = tl.load(target_lse_ptr + member_offset) * LOG2E
            elif TEMPERATURE != T_UNIT:
                target_lse_t = tm + tl.log2(ts)

            # Pass 2: the masked ends, then the whole tiles last first (what pass 1 read last is the
            # likeliest still in cache): the gradient, already scaled for the reduction; zero on
            # ignored rows.
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            kd_coef = tl.where(has_target, kd_weight * temperature, 0.0) * scale
            ce_coef = ce_weight * scale
            self_to_t = tl.exp2(2.0 * lse_t - lse1)
            cross = 0.0
            p_sum = 0.0
            for part in tl.range(0, 2):  # the masked tail, then the masked head (either may be empty)
                start = tl.where(part == 0, tail_start, 0)
                cols = start + lanes
                cross, p_sum = gradient_tile(
                    student_ptr + student_offset + cols, target_ptr + target_offset + cols,
                    grad_ptr + grad_offset + cols, cols, cols < tl.where(part == 0, num_classes, head),
                    label, lse1, lse_t, target_lse_t, self_to_t, has_target, kd_coef, ce_coef,
                    inv_temperature, tail_scale, tail_p, cross, p_sum, TEMPERATURE, SPARSE, True,
                )  # fmt: skip
            for tile in tl.range(0, full_tiles, num_stages=STAGES):
                start = head + (full_tiles - 1 - tile) * BLOCK_C
                z_offset = tl.multiple_of(student_offset + start, VEC)
                g_offset = grad_offset + start
                g_offset = tl.multiple_of(g_offset, GRAD_VEC)
                t_offset = target_offset + start
                t_offset = tl.multiple_of(t_offset, TEACHER_VEC)
                cross, p_sum = gradient_tile(
                    student_ptr + z_offset + lanes, target_ptr + t_offset + lanes,
                    grad_ptr + g_offset + lanes, start + lanes, None, label, lse1, lse_t,
                    target_lse_t, self_to_t, has_target, kd_coef, ce_coef, inv_temperature,
                    tail_scale, tail_p, cross, p_sum, TEMPERATURE, SPARSE, False,
                )  # fmt: skip
            if SPARSE:
                tl.debug_barrier()  # the dense stores above land before the known-id corrections
                grad_row = grad_ptr + grad_offset
                element = grad_ptr.dtype.element_ty
                tl.store(grad_row + ids, (grad_known * scale).to(element), mask=known & has_target)
                tl.store(
                    grad_row + label,
                    (grad_label * scale).to(element),
                    mask=has_target & label_is_extra,
                )
                if TAIL == TAIL_SAMPLED:
                    weight = kd_coef * tail_total / tail_samples
                    correct_drawn_gradient(grad_row, draws, weight, BLOCK_S)
            else:
                # sum p log p - sum p z / T + lse_q with log p = t / T - lse_p: KL(p || q_T) when p
                # sums to 1 (see partitioned_kd_reference).
                kl = cross * inv_temperature + (lse_t - target_lse_t * p_sum) * LN2

            kl = tl.where(has_target, kl, 0.0)
            row_loss = ce_weight * (lse - z_label) + kd_weight * temperature * temperature * kl
            store_row_stats(
                stats_ptr, chosen_ptr, row, tl.where(valid, row_loss, 0.0),
                tl.where(has_target, candidate, -1), kl, tl.where(valid, tl.exp(student_score), 0.0),
                tl.where(valid, tl.exp(teacher_score), 0.0),
            )  # fmt: skip
