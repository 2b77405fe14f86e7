"""The partitioned kernel's work on one tile of a row, in registers: pass 1's online sums
(``pass1_part``: the student's, and a dense teacher's at T != 1) and pass 2's gradient
(``gradient_tile``). ``kernels.partitioned_kernel`` runs them on a row's masked head, its whole
tiles (``MASKED`` false: no masks, so 16-byte loads) and its masked tail.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

if triton is not None:
    from fastkd.kernels.common import LOG2E, STREAM, T_HALF, T_UNIT

    @triton.jit
    def student_stats(
        z_ptrs,
        mask,
        m,
        s1,
        s_t,
        rest,
        z_sum,
        inv_temperature,
        TEMPERATURE: tl.constexpr,
        SUM_Z: tl.constexpr,
        SUM_REST: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """Pass 1 on one tile of the student: online sums of exp at T = 1 and at T, in log2
        units (``m`` the running max of z * log2 e), the plain sum of z (uniform tails) and the
        sum at T without one maximal element (bucket tails: the student's tail mass without the
        cancellation of 1 minus a known mass near 1)."""
        if MASKED:
            z = tl.load(z_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        else:
            z = tl.load(z_ptrs).to(tl.float32)
        u = z * LOG2E
        m_new = tl.maximum(m, tl.max(u, axis=0))
        if TEMPERATURE == T_UNIT:
            e = tl.exp2(u - m_new)
            old = s1
            s1 = s1 * tl.exp2(m - m_new) + tl.sum(e, axis=0)
            shrink = tl.exp2(m - m_new)
        elif TEMPERATURE == T_HALF:  # T = 2: exp((z - m) / 2) squared is exp(z - m)
            e = tl.exp2((u - m_new) * 0.5)
            s1 = s1 * tl.exp2(m - m_new) + tl.sum(e * e, axis=0)
            old = s_t
            shrink = tl.exp2((m - m_new) * 0.5)
            s_t = s_t * shrink + tl.sum(e, axis=0)
        else:
            s1 = s1 * tl.exp2(m - m_new) + tl.sum(tl.exp2(u - m_new), axis=0)
            e = tl.exp2((u - m_new) * inv_temperature)
            old = s_t
            shrink = tl.exp2((m - m_new) * inv_temperature)
            s_t = s_t * shrink + tl.sum(e, axis=0)
        if SUM_REST:
            # A new maximum turns the whole old sum into the rest and leaves one of its equals
            # (terms of exactly 1) out; every term is added, never subtracted.
            moved = m_new > m
            kept = tl.where(moved, old * shrink, rest)
            ones = tl.sum((e == 1.0).to(tl.float32), axis=0) - moved.to(tl.float32)
            rest = kept + tl.sum(tl.where(e < 1.0, e, 0.0), axis=0) + ones
        if SUM_Z:
            if MASKED:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            else:
                z_sum += tl.sum(z, axis=0)
        return m_new, s1, s_t, rest, z_sum

    @triton.jit
    def teacher_stats(t_ptrs, mask, m, s, inv_temperature, MASKED: tl.constexpr):
        """Pass 1 on one tile of a dense teacher at T != 1: its online sum of exp(t / T)."""
        if MASKED:
            t = tl.load(t_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        else:
            t = tl.load(t_ptrs).to(tl.float32)
        v = t * (LOG2E * inv_temperature)
        m_new = tl.maximum(m, tl.max(v, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(v - m_new), axis=0)
        return m_new, s

    @triton.jit
    def pass1_part(
        z_row, t_row, cols, mask, m, s1, s_t, rest, z_sum, tm, ts, inv_temperature,
        TEMPERATURE: tl.constexpr, READ_TEACHER: tl.constexpr, SUM_Z: tl.constexpr,
        SUM_REST: tl.constexpr, MASKED: tl.constexpr,
    ):  # fmt: skip
        """Pass 1 on the columns ``cols`` of the student's row (and, with ``READ_TEACHER``, of
        a dense teacher's at T != 1 whose log-sum-exp at T was not given: at T = 1 it is
        normalised as stored)."""
        m, s1, s_t, rest, z_sum = student_stats(
            z_row + cols, mask, m, s1, s_t, rest, z_sum, inv_temperature, TEMPERATURE, SUM_Z,
            SUM_REST, MASKED,
        )  # fmt: skip
        if READ_TEACHER:
            tm, ts = teacher_stats(t_row + cols, mask, tm, ts, inv_temperature, MASKED)
        return m, s1, s_t, rest, z_sum, tm, ts

    @triton.jit
    def gradient_tile(
        z_ptrs,
        t_ptrs,
        g_ptrs,
        cols,
        mask,
        label,
        lse1,
        lse_t,
        target_lse_t,
        self_to_t,
        has_target,
        kd_coef,
        ce_coef,
        inv_temperature,
        tail_scale,
        tail_p,
        cross,
        p_sum,
        TEMPERATURE: tl.constexpr,
        SPARSE: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """Pass 2 on one tile: the gradient ce (q - onehot(y)) + kd T (q_T - p_T), stored in the
        gradient's dtype (sparse: the tail's, kd T (tail_scale q_T - tail_p), everywhere); a
        dense teacher's KL terms sum p (t - z) and sum p on the way.

        ``lse1``, ``lse_t`` (student at T = 1 and T) and ``target_lse_t`` in log2 units of z and
        z / T; ``self_to_t`` = exp2(2 lse_t - lse1) turns (q_T)^2 into q at T = 2."""
        if MASKED:
            z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        else:
            z = tl.load(z_ptrs).to(tl.float32)
        u = z * LOG2E
        if TEMPERATURE == T_UNIT:
            q = tl.exp2(u - lse1)
            q_t = q
        elif TEMPERATURE == T_HALF:
            q_t = tl.exp2(u * 0.5 - lse_t)
            q = q_t * q_t * self_to_t
        else:
            q = tl.exp2(u - lse1)
            q_t = tl.exp2(u * inv_temperature - lse_t)
        g = ce_coef * (q - (cols == label).to(tl.float32))
        if SPARSE:
            g += kd_coef * (q_t * tail_scale - tail_p)
        else:
            if MASKED:
                t = tl.load(t_ptrs, mask=mask & has_target, other=0.0).to(tl.float32)
            else:
                t = tl.load(t_ptrs, mask=has_target, other=0.0).to(tl.float32)
            p = tl.exp2(t * (LOG2E * inv_temperature) - target_lse_t)
            p = tl.where((mask & has_target) if MASKED else has_target, p, 0.0)
            g += kd_coef * (q_t - p)
            cross += tl.sum(p * (t - z), axis=0)
            p_sum += tl.sum(p, axis=0)
        # The gradient is written once and not read here again: streamed out (evict_first), so
        # the rows still to be re-read keep L2. (No load hint: the whole tiles' loads are
        # asynchronous copies, which Triton 3.8 issues without one; on the masked ends a hint
        # cost 20-30 registers.)
        if MASKED:
            tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=mask, eviction_policy=STREAM)
        else:
            tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), eviction_policy=STREAM)
        return cross, p_sum
