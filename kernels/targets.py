"""``PoolTargets``: the tensor form of a pool's stored soft targets, as the KD kernels take them.

One row per (sample, view), one column per pool member. Every member stores, at T = 1, the
log-sum-exp of its full logits and its true-class logit, so its confidence ``log p_m(y) =
true_logit - lse`` is exact even when y is outside a stored top-k. The distribution itself is
stored either dense (all C logits) or sparse (its top-k ids and logits).

Sparse targets are turned into a full-vocabulary distribution by the *uniform tail* rule (one home
for it: ``full_vocab_logits``; the Triton kernel re-implements it in registers and the tests hold
the two equal). The known logits are the top-k plus the true-class logit when y is not in the
top-k; the C - |known| unknown classes share the remaining T = 1 mass equally, each getting the
tail logit ``z_tail = lse + log(max(1 - sum_known p, TAIL_MASS_FLOOR) / (C - |known|))``. At
temperature T the target is softmax over all C logits / T, a proper distribution at any T; at
T = 1 it reproduces the stored p(y) and the known probabilities exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from fastkd.errors import ConfigError
from fastkd.kernels.common import assert_all

TAIL_MASS_FLOOR = 1e-12
"""Smallest tail mass at T = 1: fp16 top-k logits can sum to slightly more than 1."""


@dataclass
class PoolTargets:
    """Stored targets of M pool members for B rows: sparse (top-k) or dense, never both."""

    lse: Tensor  # [B, M] fp32, log-sum-exp of the member's full logits at T = 1
    true_logit: Tensor  # [B, M] fp32, the member's logit of the label
    topk_logits: Tensor | None = None  # [B, M, K] fp16/bf16/fp32 (sparse)
    topk_ids: Tensor | None = None  # [B, M, K] integer class ids, distinct per (row, member)
    logits: Tensor | None = None  # [B, M, C] (dense)

    def __post_init__(self) -> None:
        if self.lse.dim() != 2 or self.true_logit.shape != self.lse.shape:
            raise ConfigError(
                "PoolTargets.lse and .true_logit must both be [B, M], got "
                f"{tuple(self.lse.shape)} and {tuple(self.true_logit.shape)}"
            )
        sparse = self.topk_logits is not None or self.topk_ids is not None
        if sparse == (self.logits is not None):
            raise ConfigError("PoolTargets needs either topk_logits + topk_ids or logits, not both")
        rows_members = tuple(self.lse.shape)
        if sparse:
            if self.topk_logits is None or self.topk_ids is None:
                raise ConfigError("sparse PoolTargets needs both topk_logits and topk_ids")
            if self.topk_logits.shape != self.topk_ids.shape or self.topk_ids.dim() != 3:
                raise ConfigError(
                    "PoolTargets.topk_logits and .topk_ids must both be [B, M, K], got "
                    f"{tuple(self.topk_logits.shape)} and {tuple(self.topk_ids.shape)}"
                )
            if tuple(self.topk_ids.shape[:2]) != rows_members:
                raise ConfigError(
                    f"PoolTargets.topk_ids is {tuple(self.topk_ids.shape)}, lse is {rows_members}"
                )
            if self.topk_ids.dtype.is_floating_point or self.topk_ids.dtype == torch.bool:
                raise ConfigError(
                    f"PoolTargets.topk_ids must be integers, got {self.topk_ids.dtype}"
                )
        elif self.logits.dim() != 3 or tuple(self.logits.shape[:2]) != rows_members:
            raise ConfigError(
                f"PoolTargets.logits must be [B, M, C] with [B, M] = {rows_members}, "
                f"got {tuple(self.logits.shape)}"
            )

    @classmethod
    def from_logits(cls, logits: Tensor, labels: Tensor, topk: int = 0) -> PoolTargets:
        """Targets of live or freshly computed logits [B, M, C]; ``topk`` > 0 keeps the top-k only.

        Labels outside [0, C) (ignore_index rows) get the logit of class 0 as a placeholder.
        """
        if logits.dim() != 3:
            raise ConfigError(f"logits must be [B, M, C], got {tuple(logits.shape)}")
        z = logits.detach().float()
        index = labels.clamp(0, z.shape[-1] - 1).view(-1, 1, 1).expand(-1, z.shape[1], 1)
        lse = torch.logsumexp(z, dim=-1)
        true_logit = z.gather(-1, index).squeeze(-1)
        if topk <= 0:
            return cls(lse=lse, true_logit=true_logit, logits=logits.detach())
        values, ids = logits.detach().topk(topk, dim=-1)
        return cls(lse=lse, true_logit=true_logit, topk_logits=values, topk_ids=ids)

    @property
    def is_sparse(self) -> bool:
        return self.topk_ids is not None

    @property
    def num_rows(self) -> int:
        return self.lse.shape[0]

    @property
    def num_members(self) -> int:
        return self.lse.shape[1]

    @property
    def topk(self) -> int:
        """Stored top-k, 0 for dense targets."""
        return self.topk_ids.shape[-1] if self.topk_ids is not None else 0

    def logprob(self) -> Tensor:
        """[B, M] fp32 true-class log-probabilities at T = 1, the partition's confidence."""
        return self.true_logit.float() - self.lse.float()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PoolTargets:
        moved = {
            f.name: None
            if getattr(self, f.name) is None
            else getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return PoolTargets(**moved)

    def check(self, num_rows: int, num_classes: int, device: torch.device | None = None) -> None:
        """Raise ConfigError unless these targets fit ``num_rows`` rows of ``num_classes`` logits
        (on ``device``, when given). The id range is checked without a host sync on CUDA
        (``assert_all``); training checks stored ids once per block as the store reader loads
        them."""
        if device is not None:
            for f in fields(self):
                value = getattr(self, f.name)
                if value is not None and value.device != device:
                    raise ConfigError(f"PoolTargets.{f.name} is on {value.device}, not {device}")
        if self.num_rows != num_rows:
            raise ConfigError(f"PoolTargets has {self.num_rows} rows, the logits have {num_rows}")
        if self.logits is not None and self.logits.shape[-1] != num_classes:
            raise ConfigError(
                f"PoolTargets.logits has {self.logits.shape[-1]} classes, the logits {num_classes}"
            )
        if self.topk_ids is not None:
            if self.topk > num_classes:
                raise ConfigError(f"PoolTargets top-k {self.topk} exceeds {num_classes} classes")
            ids = self.topk_ids
            assert_all(
                (ids >= 0) & (ids < num_classes),
                f"PoolTargets.topk_ids holds ids outside [0, {num_classes})",
            )

    def full_vocab_logits(self, member: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        """[B, C] fp32 logits (T = 1) of member ``member[b]`` on each row; sparse: uniform tail.

        The reference definition of the tail rule (module docstring); differentiable nowhere,
        since stored targets are constants.
        """
        rows = torch.arange(self.num_rows, device=member.device)
        if self.logits is not None:
            return self.logits[rows, member].float()
        ids = self.topk_ids[rows, member].long()
        values = self.topk_logits[rows, member].float()
        lse = self.lse[rows, member].float().unsqueeze(1)
        labels = labels.clamp(0, num_classes - 1).unsqueeze(1)
        out = torch.zeros(self.num_rows, num_classes, device=values.device)
        out.scatter_(1, labels, self.true_logit[rows, member].float().unsqueeze(1))
        out.scatter_(1, ids, values)  # a label inside the top-k keeps its top-k logit
        known = torch.zeros_like(out, dtype=torch.bool)
        known.scatter_(1, labels, True)
        known.scatter_(1, ids, True)
        known_mass = torch.where(known, (out - lse).exp(), 0.0).sum(1, keepdim=True)
        tail_count = num_classes - known.sum(1, keepdim=True)
        tail_mass = (1.0 - known_mass).clamp_min(TAIL_MASS_FLOOR)
        tail_logit = lse + torch.log(tail_mass / tail_count.clamp_min(1))
        return torch.where(known, out, tail_logit)
