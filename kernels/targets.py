"""``PoolTargets``: the tensor form of a pool's stored soft targets, as the KD kernels take them.

One row per (sample, view), one column per pool member. What each member keeps of its logits is
``fastkd.compression``'s rule: the exact fp32 ``log p_m(y)`` at T = 1 (the partition's
confidence), then either every class's log-probability (dense) or its top-k and the fp32 log of
the mass outside the top-k and the label (sparse), read by one of three tail models.

This module is the reference definition of what a sparse target means at a temperature T, the
one the Triton kernel re-implements in registers (the tests hold the two equal, and sparse equal
to dense when nothing is left outside the known classes). The known classes are the top-k plus
the label, the n unknown ones the tail. At T the known classes get p^(1/T) and the tail its
mass at T, ``exp(A(1/T))`` (``compression.tail_logmass``: exact at T = 1 and 2), all normalised;
the tail's mass is spread

* ``uniform``: equally over the n unknown classes;
* ``bucket``: as uniform, but the divergence is the KL of the (known + 1)-bucket distributions,
  the student's tail bucket being the sum of its probabilities there (so its shape inside the
  tail is free: its gradient at an unknown class i is T q_i (1 - P_T / Q_T));
* ``sampled``: over the drawn ids by their counts (each of the S draws carries 1 / S of it);
  undrawn classes get nothing. At T = 1 this is unbiased for every class; at other T it is not.

Dense targets at T = 1 are the stored log-probabilities as they are (their fp16 rounding leaves
the sum a hair off 1; the loss used, sum p log p - sum p z / T + lse(z / T), has gradient q_T - p
all the same); at other T, softmax(logprobs / T).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastkd.choices import PartitionScore
from fastkd.compression import (
    DEFAULT_TAIL,
    MAX_TAIL_SAMPLES,
    TailModel,
    compress_logits,
    parse_tail,
    tail_logmass,
)
from fastkd.errors import ConfigError
from fastkd.kernels.common import assert_all

MIXTURE_LOG_FLOOR = -1e4
"""A mixture's log-probability where every teacher puts 0 (undrawn ids of sampled tails): its
probability is 0 in fp32 and fp64 alike, and the kernel's p (t - z) stays 0 instead of NaN."""

TARGET_FIELDS = (
    "true_logprob",
    "logprobs",
    "topk_logprobs",
    "topk_ids",
    "log_tail",
    "log_tail_sqrt",
    "tail_ids",
    "logprobs_lse",
)
"""The tensor fields of ``PoolTargets``: the store's ``PoolArrays``' own, in its order, then
``logprobs_lse`` (made from them, ``teacher_lse``)."""


def teacher_lse(logprobs: Tensor, temperature: float) -> Tensor:
    """[..., M] fp32 logsumexp(logprobs / T) over the classes of dense targets [..., M, C]: the
    normaliser of their target at T, which the partitioned kernel otherwise sums in pass 1."""
    return (logprobs.float() / temperature).logsumexp(-1)


@dataclass
class PoolTargets:
    """Stored targets of M pool members for B rows: dense or sparse, never both."""

    true_logprob: Tensor  # [B, M] fp32 log p(y) at T = 1, exact whatever else is kept
    logprobs: Tensor | None = None  # [B, M, C] (dense) log-probabilities at T = 1
    topk_logprobs: Tensor | None = None  # [B, M, K] (sparse) descending
    topk_ids: Tensor | None = None  # [B, M, K] integer class ids, distinct per (row, member)
    log_tail: Tensor | None = None  # [B, M] fp32 (sparse) log of the mass outside top-k and y
    log_tail_sqrt: Tensor | None = None  # [B, M] fp16 (sparse) log sum of sqrt(p) there
    tail_ids: Tensor | None = None  # [B, M, S] (sampled tail) sorted draws from the tail
    tail: TailModel = DEFAULT_TAIL  # how a sparse target's unknown classes are read
    # [B, M] fp32 (dense) teacher_lse(logprobs, lse_temperature): the kernel reads it instead of
    # summing the teacher in pass 1 when the loss runs at that temperature (``with_lse``)
    logprobs_lse: Tensor | None = None
    lse_temperature: float | None = None

    def __post_init__(self) -> None:
        self.tail = parse_tail(self.tail)
        if (self.logprobs_lse is None) != (self.lse_temperature is None):
            raise ConfigError("PoolTargets.logprobs_lse is given with its lse_temperature")
        if self.true_logprob.dim() != 2:
            raise ConfigError(
                f"PoolTargets.true_logprob must be [B, M], got {tuple(self.true_logprob.shape)}"
            )
        rows_members = tuple(self.true_logprob.shape)
        sparse = self.topk_logprobs is not None or self.topk_ids is not None
        if sparse == (self.logprobs is not None):
            raise ConfigError(
                "PoolTargets needs either topk_logprobs + topk_ids + log_tail or logprobs, not both"
            )
        if not sparse:
            if self.logprobs.dim() != 3 or tuple(self.logprobs.shape[:2]) != rows_members:
                raise ConfigError(
                    f"PoolTargets.logprobs must be [B, M, C] with [B, M] = {rows_members}, "
                    f"got {tuple(self.logprobs.shape)}"
                )
            lse = self.logprobs_lse
            if lse is not None and tuple(lse.shape) != rows_members:
                raise ConfigError(
                    f"PoolTargets.logprobs_lse must be [B, M] = {rows_members}, got "
                    f"{tuple(lse.shape)}"
                )
            return
        if self.logprobs_lse is not None:
            raise ConfigError("PoolTargets.logprobs_lse belongs to dense targets only")
        if any(
            getattr(self, name) is None
            for name in ("topk_logprobs", "topk_ids", "log_tail", "log_tail_sqrt")
        ):
            raise ConfigError(
                "sparse PoolTargets needs topk_logprobs, topk_ids, log_tail and log_tail_sqrt"
            )
        if self.topk_logprobs.shape != self.topk_ids.shape or self.topk_ids.dim() != 3:
            raise ConfigError(
                "PoolTargets.topk_logprobs and .topk_ids must both be [B, M, K], got "
                f"{tuple(self.topk_logprobs.shape)} and {tuple(self.topk_ids.shape)}"
            )
        masses = (self.log_tail, self.log_tail_sqrt)
        shapes = [tuple(self.topk_ids.shape[:2]), *(tuple(t.shape) for t in masses)]
        if any(shape != rows_members for shape in shapes):
            raise ConfigError(
                f"PoolTargets: topk_ids {tuple(self.topk_ids.shape)}, log_tail and log_tail_sqrt "
                f"{shapes[1:]} must match true_logprob's [B, M] = {rows_members}"
            )
        for name in ("topk_ids", "tail_ids"):
            ids = getattr(self, name)
            if ids is not None and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
                raise ConfigError(f"PoolTargets.{name} must be integers, got {ids.dtype}")
        if (self.tail is TailModel.SAMPLED) != (self.tail_ids is not None):
            raise ConfigError("PoolTargets.tail_ids is given exactly when the tail is 'sampled'")
        if self.tail_ids is not None and (
            self.tail_ids.dim() != 3
            or tuple(self.tail_ids.shape[:2]) != rows_members
            or not 1 <= self.tail_ids.shape[2] <= MAX_TAIL_SAMPLES
        ):
            raise ConfigError(
                f"PoolTargets.tail_ids must be [B, M, S] with [B, M] = {rows_members} and "
                f"1 <= S <= {MAX_TAIL_SAMPLES}, got {tuple(self.tail_ids.shape)}"
            )

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        labels: Tensor,
        topk: int = 0,
        tail: TailModel | str = DEFAULT_TAIL,
        tail_samples: int = 0,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> PoolTargets:
        """Targets of live logits [B, M, C], kept as a store would keep them (``topk`` > 0:
        sparse with ``tail``; the sampled tail draws its uniforms from ``generator``); dense
        ones at a ``temperature`` other than 1 carry their log-sum-exp at it (``with_lse``).

        Labels outside [0, C) (ignore_index rows) are read as class 0.
        """
        if logits.dim() != 3:
            raise ConfigError(f"logits must be [B, M, C], got {tuple(logits.shape)}")
        tail = parse_tail(tail)
        labels = labels.clamp(0, logits.shape[-1] - 1).unsqueeze(1).expand(logits.shape[:2])
        uniforms = None
        if topk and tail is TailModel.SAMPLED:
            uniforms = torch.rand(
                labels.shape, generator=generator, device=logits.device, dtype=torch.float64
            )
        kept = compress_logits(logits.detach(), labels, topk, tail, tail_samples, uniforms)
        return cls(**kept, tail=tail if topk else DEFAULT_TAIL).with_lse(temperature)

    def with_lse(self, temperature: float) -> PoolTargets:
        """These targets carrying ``teacher_lse`` at ``temperature`` (dense, T != 1; else as
        they are), so the partitioned kernel's pass 1 at that T reads the student alone."""
        if self.logprobs is None or float(temperature) == 1.0:
            return self
        if self.lse_temperature == float(temperature):
            return self
        return dataclasses.replace(
            self,
            logprobs_lse=teacher_lse(self.logprobs, temperature),
            lse_temperature=float(temperature),
        )

    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

    @property
    def num_rows(self) -> int:
        return self.true_logprob.shape[0]

    @property
    def num_members(self) -> int:
        return self.true_logprob.shape[1]

    @property
    def topk(self) -> int:
        """Stored top-k, 0 for dense targets."""
        return self.topk_ids.shape[-1] if self.topk_ids is not None else 0

    @property
    def tail_samples(self) -> int:
        """Stored tail draws per row, 0 unless the tail is sampled."""
        return self.tail_ids.shape[-1] if self.tail_ids is not None else 0

    def logprob(self) -> Tensor:
        """[B, M] fp32 true-class log-probabilities at T = 1, the partition's confidence."""
        return self.true_logprob.float()

    def max_logprob(self) -> Tensor:
        """[B, M] fp32 max_c log p(c) at T = 1, the confidence in the top class: the largest
        stored log-probability (dense), the largest of the top-k, which are the largest (sparse)."""
        stored = self.logprobs if self.logprobs is not None else self.topk_logprobs
        return stored.amax(-1).float()  # max commutes with the cast: no fp32 copy of the rows

    def partition_scores(self, score: PartitionScore | str) -> Tensor:
        """[B, M] fp32 what the partition compares (``fastkd.partition.PartitionScore``):
        log p(y) (``label``) or max_c log p(c) (``confidence``)."""
        if PartitionScore(score) is PartitionScore.LABEL:
            return self.logprob()
        return self.max_logprob()

    def select(self, members: list[int]) -> PoolTargets:
        """These member columns only, in this order (slices: no index copied to the device)."""
        picked = {
            name: None
            if getattr(self, name) is None
            else torch.cat([getattr(self, name)[:, m : m + 1] for m in members], dim=1)
            for name in TARGET_FIELDS
        }
        return PoolTargets(**picked, tail=self.tail, lse_temperature=self.lse_temperature)

    def mixture(
        self,
        temperature: float,
        labels: Tensor | None = None,
        num_classes: int | None = None,
        exclude: int | None = None,
    ) -> PoolTargets:
        """Plain KD's target: one dense fp32 column whose target at ``temperature`` is exactly
        p = mean_m p_m,T over the members (less column ``exclude``, the student's own), each
        member's p_m,T its ``target_logprobs`` (dense: softmax(logprobs / T); sparse: its tail
        model's spread, the bucket tail's equal spread over the tail, as uniform). The column is
        T log p (normalised), so the kernels' softmax(column / T) is p at any T, and at T = 1 the
        column is log p as they use it; ``true_logprob`` is the mixture's log p(y) at T = 1,
        log mean_m p_m(y). A single member is returned as it is (sparse stays sparse).

        Sparse targets need ``labels`` [B] (their known classes include the label's) and
        ``num_classes``; labels outside [0, C) (ignored rows) are read as class 0.
        """
        members = [m for m in range(self.num_members) if m != exclude]
        if not members:
            raise ConfigError("plain KD needs a teacher besides the student")
        if len(members) == 1:
            return self if self.num_members == 1 else self.select(members)
        if self.logprobs is not None:
            num_classes = self.logprobs.shape[-1]
            labels = torch.zeros(self.num_rows, dtype=torch.long, device=self.logprobs.device)
        elif labels is None or num_classes is None:
            raise ConfigError("the mixture of sparse targets needs the labels and num_classes")
        mixed = None
        for m in members:
            member = torch.full_like(labels, m, dtype=torch.long)
            log_p = self.target_logprobs(member, labels, num_classes, temperature)
            mixed = log_p if mixed is None else torch.logaddexp(mixed, log_p)
        log_p = mixed.log_softmax(-1).clamp_min(MIXTURE_LOG_FLOOR)  # mean_m p_m, normalised
        true_logprob = self.logprob()[:, members].logsumexp(1) - math.log(len(members))
        return PoolTargets(
            true_logprob=true_logprob.unsqueeze(1), logprobs=(log_p * temperature).unsqueeze(1)
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PoolTargets:
        moved = {
            name: None
            if getattr(self, name) is None
            else getattr(self, name).to(device, non_blocking=non_blocking)
            for name in TARGET_FIELDS
        }
        return PoolTargets(**moved, tail=self.tail, lse_temperature=self.lse_temperature)

    def check(self, num_rows: int, num_classes: int, device: torch.device | None = None) -> None:
        """Raise ConfigError unless these targets fit ``num_rows`` rows of ``num_classes`` logits
        (on ``device``, when given). The id range is checked without a host sync on CUDA
        (``assert_all``); training checks stored ids once per block as the store reader loads
        them."""
        if device is not None:
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, Tensor) and value.device != device:
                    raise ConfigError(f"PoolTargets.{f.name} is on {value.device}, not {device}")
        if self.num_rows != num_rows:
            raise ConfigError(f"PoolTargets has {self.num_rows} rows, the logits have {num_rows}")
        if self.logprobs is not None and self.logprobs.shape[-1] != num_classes:
            raise ConfigError(
                f"PoolTargets.logprobs has {self.logprobs.shape[-1]} classes, the logits "
                f"{num_classes}"
            )
        if self.topk > num_classes:
            raise ConfigError(f"PoolTargets top-k {self.topk} exceeds {num_classes} classes")
        for name in ("topk_ids", "tail_ids"):
            ids = getattr(self, name)
            if ids is not None:
                assert_all(
                    (ids >= 0) & (ids < num_classes),
                    f"PoolTargets.{name} holds ids outside [0, {num_classes})",
                )
        if self.tail_ids is not None:  # the kernel counts repeats as neighbours of sorted draws
            draws = self.tail_ids
            assert_all(
                draws[..., 1:] >= draws[..., :-1], "PoolTargets.tail_ids must be sorted per row"
            )
            clash = (draws.unsqueeze(-1) == self.topk_ids.unsqueeze(-2)).any(-1).any(-1)
            assert_all(
                ~clash | torch.isneginf(self.log_tail),
                "PoolTargets.tail_ids draws a top-k class: draws come from the tail only",
            )

    # -- the reference reading (module docstring) ------------------------------------------------

    def known_logprobs(
        self, member: Tensor, labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """[B, C] in ``dtype``: member ``member[b]``'s stored T = 1 log-probabilities of its
        known classes (all when dense; the top-k and the label when sparse), -inf elsewhere."""
        rows = torch.arange(self.num_rows, device=member.device)
        if self.logprobs is not None:
            return self.logprobs[rows, member].to(dtype)
        labels = labels.clamp(0, num_classes - 1).unsqueeze(1)
        out = torch.full(
            (self.num_rows, num_classes), float("-inf"), device=member.device, dtype=dtype
        )
        out.scatter_(1, labels, self.true_logprob[rows, member].to(dtype).unsqueeze(1))
        ids = self.topk_ids[rows, member].long()
        return out.scatter(1, ids, self.topk_logprobs[rows, member].to(dtype))

    def target_logprobs(
        self,
        member: Tensor,
        labels: Tensor,
        num_classes: int,
        temperature: float,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """[B, C] log-probabilities (``dtype``) of member ``member[b]``'s target at ``temperature``:
        the known classes' p^(1/T) and the tail's mass at T (``tail_logmass``) spread over the tail
        equally (uniform; also the bucket's target, read bucketed by ``divergence``) or by the
        draws' counts (sampled), normalised. Dense: as stored at T = 1, else softmax(logprobs / T).
        """
        known = self.known_logprobs(member, labels, num_classes, dtype)
        if self.logprobs is not None:
            return known if temperature == 1.0 else (known / temperature).log_softmax(-1)
        beta = 1.0 / temperature
        rows = torch.arange(self.num_rows, device=member.device)
        unknown = torch.isneginf(known)
        count = unknown.sum(1)
        log_mass = tail_logmass(
            self.log_tail[rows, member].to(dtype),
            self.log_tail_sqrt[rows, member].to(dtype),
            count,
            beta,
        ).unsqueeze(1)
        if self.tail is TailModel.SAMPLED:
            draws = self.tail_ids[rows, member].long()
            hits = torch.zeros_like(known).scatter_add_(
                1, draws, torch.ones_like(known[:, :1]).expand_as(draws)
            )
            tail = log_mass + (hits / self.tail_samples).log()
        else:
            tail = log_mass - count.clamp_min(1).to(dtype).log().unsqueeze(1)
        return torch.where(unknown, tail, known * beta).log_softmax(-1)

    def divergence(
        self, member: Tensor, labels: Tensor, student_logits: Tensor, temperature: float
    ) -> Tensor:
        """[B] the KD divergence of the student from member ``member[b]``'s target at T, in the
        student's dtype (fp32 or fp64), differentiable in ``student_logits``: sum p log p -
        sum p z / T + lse(z / T) over the classes (KL(p || q_T) for a normalised p); for the
        bucket tail, over the known classes and the tail as one bucket."""
        z = student_logits
        num_classes = z.shape[1]
        log_p = self.target_logprobs(member, labels, num_classes, temperature, z.dtype)
        z_t = z / temperature
        if self.logprobs is not None or self.tail is not TailModel.BUCKET:
            p = log_p.exp()
            return (
                torch.where(p > 0, p * log_p, 0.0).sum(-1) - (p * z_t).sum(-1) + z_t.logsumexp(-1)
            )
        log_q = z_t.log_softmax(-1)
        unknown = torch.isneginf(self.known_logprobs(member, labels, num_classes))
        p = torch.where(unknown, 0.0, log_p.exp())
        known_kl = (p * (torch.where(unknown, 0.0, log_p) - log_q)).sum(-1)
        log_p_tail = torch.where(unknown, log_p, -math.inf).logsumexp(-1)
        log_q_tail = torch.where(unknown, log_q, -math.inf).logsumexp(-1)
        tail_kl = log_p_tail.exp() * (log_p_tail - log_q_tail)
        return known_kl + torch.where(torch.isneginf(log_p_tail), 0.0, tail_kl)
