"""A sparse target's terms in registers: the Triton side of ``kernels.targets``' tail models.

``sparse_target_terms`` runs once per row of the partitioned kernel, between its two passes over
the student's row. It reads the chosen member's stored top-k, its exact label log-probability,
the tail's two log-masses (and, for the sampled tail, its draws), forms the target at T as
``PoolTargets.target_logprobs`` defines it, and returns the row's KL, what pass 2 writes on every
tail class (kd T (tail_scale q_T - tail_p)) and the gradient at the known and drawn ids, which the
kernel scatters after pass 2 (the drawn ids through ``correct_drawn_gradient``). Everything in
natural-log units, fp32.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

TAIL_UNIFORM, TAIL_BUCKET, TAIL_SAMPLED = 0, 1, 2
STUDENT_TAIL_FLOOR = 1e-30
"""Floor of the bucket tail's student mass (no division by an underflowed 0)."""

if triton is not None:
    from fastkd.kernels.common import LOG2E, T_HALF, T_UNIT

    _FLOOR = tl.constexpr(STUDENT_TAIL_FLOOR)
    TAIL_UNIFORM = tl.constexpr(TAIL_UNIFORM)  # the kernels compare constexprs to these
    TAIL_BUCKET = tl.constexpr(TAIL_BUCKET)
    TAIL_SAMPLED = tl.constexpr(TAIL_SAMPLED)

    @triton.jit
    def _tail_logmass(log_tail, log_tail_sqrt, tail_count, beta, TEMPERATURE: tl.constexpr):
        """``compression.tail_logmass``: the stored value at T = 1 and 2, else the parabola
        through (0, log n), (1/2, log_tail_sqrt) and (1, log_tail) within the power-mean bounds;
        -inf for an empty or massless tail."""
        if TEMPERATURE == T_UNIT:
            value = log_tail
        elif TEMPERATURE == T_HALF:
            value = log_tail_sqrt
        else:
            a0 = tl.log(tl.maximum(tail_count, 1.0))
            d1 = log_tail - a0
            a2 = 2.0 * (d1 - 2.0 * (log_tail_sqrt - a0))
            value = a0 + (d1 - a2) * beta + a2 * beta * beta
            power = beta * log_tail
            chord = (1.0 - beta) * a0 + beta * log_tail
            value = tl.minimum(
                tl.maximum(value, tl.minimum(power, chord)), tl.maximum(power, chord)
            )
        has_tail = (tail_count > 0) & (log_tail > float("-inf"))
        return tl.where(has_tail, value, float("-inf")), has_tail

    @triton.jit
    def sparse_target_terms(
        student_row,
        ids_row,
        values_row,
        draws_row,
        label,
        label_logprob,
        log_tail,
        log_tail_sqrt,
        z_label,
        z_sum,
        lse,
        student_lse_t,
        student_max,
        student_sum_t,
        student_rest_t,
        num_classes,
        topk,
        tail_samples,
        inv_temperature,
        temperature,
        kd_weight,
        ce_weight,
        TAIL: tl.constexpr,
        TEMPERATURE: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """The row's KL, pass 2's tail coefficients and the gradient at the known / drawn ids.

        ``lse`` and ``student_lse_t``: the student's log-sum-exp of z and of z / T; ``z_sum``
        its row sum (uniform tail only); ``student_max`` its max of z log2 e and, in units of
        exp2((z log2 e - max) / T), ``student_sum_t`` its sum at T and ``student_rest_t`` that sum
        without one maximal element (bucket tail only)."""
        beta = inv_temperature
        label = label.to(tl.int32)  # ids are int32 in registers (C < 2^31): half the registers
        # Known classes: the top-k, and the label when it is not among them.
        ks = tl.arange(0, BLOCK_K)
        known = ks < topk
        ids = tl.load(ids_row + ks, mask=known, other=-1).to(tl.int32)
        values = tl.load(values_row + ks, mask=known, other=0.0).to(tl.float32)
        label_is_extra = tl.sum((known & (ids == label)).to(tl.int32), axis=0) == 0
        extra = label_is_extra.to(tl.float32)
        tail_count = (num_classes - topk - label_is_extra.to(tl.int32)).to(tl.float32)
        log_mass, has_tail = _tail_logmass(log_tail, log_tail_sqrt, tail_count, beta, TEMPERATURE)

        # The target at T: known p^(1/T) and the tail's mass at T, normalised.
        known_t = tl.where(known, values * beta, float("-inf"))
        label_t = tl.where(label_is_extra, label_logprob * beta, float("-inf"))
        top = tl.maximum(tl.max(known_t, axis=0), tl.maximum(label_t, log_mass))
        target_lse = top + tl.log(
            tl.sum(tl.exp(known_t - top), axis=0) + tl.exp(label_t - top) + tl.exp(log_mass - top)
        )
        log_p_known = known_t - target_lse
        p_known = tl.where(known, tl.exp(log_p_known), 0.0)
        log_p_label = label_t - target_lse
        p_label = tl.where(label_is_extra, tl.exp(log_p_label), 0.0)
        tail_total = tl.where(has_tail, tl.exp(log_mass - target_lse), 0.0)

        # The student at the known classes.
        z_known = tl.load(student_row + ids, mask=known, other=0.0).to(tl.float32)
        log_q_known = z_known * beta - student_lse_t
        q_known = tl.exp(log_q_known)
        log_q_label = z_label * beta - student_lse_t
        q_label = tl.exp(log_q_label)
        kl = tl.sum(tl.where(known, p_known * (log_p_known - log_q_known), 0.0), axis=0)
        kl += tl.where(label_is_extra, p_label * (log_p_label - log_q_label), 0.0)

        draws = tl.full([BLOCK_S], -1, dtype=tl.int32)
        tail_scale = 1.0
        tail_p = 0.0
        if TAIL == TAIL_UNIFORM:
            # Every tail class: p = P_T / n; sum over the tail of p log(p / q).
            tail_p = tail_total / tl.maximum(tail_count, 1.0)
            log_tail_p = log_mass - tl.log(tl.maximum(tail_count, 1.0)) - target_lse
            tail_z_sum = z_sum - tl.sum(tl.where(known, z_known, 0.0), axis=0) - extra * z_label
            kl += tl.where(
                has_tail,
                tail_total * (log_tail_p + student_lse_t) - tail_p * beta * tail_z_sum,
                0.0,
            )
        elif TAIL == TAIL_BUCKET:
            # One bucket: the student's tail mass Q_T. Where a known class holds the student's
            # maximum, Q_T is its sum at T without that element less the other known terms: no
            # 1 - (a known mass near 1) cancellation. Otherwise the maximum is in the tail and
            # Q_T = 1 - known mass is far from 0. The gradient there is T q_T (1 - P_T / Q_T).
            # Terms of exactly 1 are the maximum's (and its equals'), as pass 1 counted them.
            e_known = tl.where(known, tl.exp2((z_known * LOG2E - student_max) * beta), 0.0)
            e_label = tl.where(label_is_extra, tl.exp2((z_label * LOG2E - student_max) * beta), 0.0)
            at_max = tl.sum((e_known == 1.0).to(tl.float32), axis=0) + (e_label == 1.0).to(
                tl.float32
            )
            below = tl.sum(tl.where(e_known < 1.0, e_known, 0.0), axis=0) + tl.where(
                e_label < 1.0, e_label, 0.0
            )
            tail_sum = tl.where(
                at_max > 0,
                student_rest_t - below - (at_max - 1.0),
                student_sum_t - tl.sum(e_known, axis=0) - e_label,
            )
            student_tail = tl.maximum(tail_sum / student_sum_t, _FLOOR)
            kl += tl.where(
                has_tail, tail_total * (log_mass - target_lse - tl.log(student_tail)), 0.0
            )
            tail_scale = 1.0 - tail_total / student_tail
        else:
            # Sampled: each distinct drawn id gets P_T * (its count) / S; the rest of the tail 0.
            ss = tl.arange(0, BLOCK_S)
            drawn = ss < tl.where(log_mass > float("-inf"), tail_samples, 0)
            draws = tl.load(draws_row + ss, mask=drawn, other=-1).to(tl.int32)
            previous = tl.load(draws_row + ss - 1, mask=drawn & (ss > 0), other=-1).to(tl.int32)
            first_draw = drawn & (draws != previous)  # draws are sorted: repeats are adjacent
            counts = _draw_counts(draws)
            log_p_draw = log_mass - target_lse + tl.log(counts / tail_samples)
            p_draw = tl.where(first_draw, tl.exp(log_p_draw), 0.0)
            z_draw = tl.load(student_row + draws, mask=first_draw, other=0.0).to(tl.float32)
            log_q_draw = z_draw * beta - student_lse_t
            kl += tl.sum(tl.where(first_draw, p_draw * (log_p_draw - log_q_draw), 0.0), axis=0)

        grad_known = ce_weight * (
            tl.exp(z_known - lse) - (ids == label).to(tl.float32)
        ) + kd_weight * temperature * (q_known - p_known)
        grad_label = ce_weight * (tl.exp(z_label - lse) - 1.0) + kd_weight * temperature * (
            q_label - p_label
        )
        return (
            kl, tail_scale, tail_p, tail_total, ids, known, grad_known, label_is_extra, grad_label,
            draws,
        )  # fmt: skip

    @triton.jit
    def _draw_counts(draws):
        """How many draws equal each one (-1: not drawn, counted 0 times)."""
        same = (draws[:, None] == draws[None, :]) & (draws[None, :] >= 0)
        return tl.sum(same.to(tl.float32), axis=1)

    @triton.jit
    def correct_drawn_gradient(grad_row, draws, weight, BLOCK_S: tl.constexpr):
        """After pass 2 wrote kd T q_T on every tail column: subtract ``weight`` (kd T P_T / S,
        scaled) per draw at each distinct drawn id, read back from the gradient row, so only
        the draws stay in registers through pass 2."""
        ss = tl.arange(0, BLOCK_S)
        earlier = (draws[:, None] == draws[None, :]) & (ss[None, :] < ss[:, None])
        first = (draws >= 0) & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
        grad = tl.load(grad_row + draws, mask=first, other=0.0).to(tl.float32)
        corrected = grad - weight * _draw_counts(draws)
        tl.store(grad_row + draws, corrected.to(grad_row.dtype.element_ty), mask=first)
