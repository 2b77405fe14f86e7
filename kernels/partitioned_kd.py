"""Partitioned KD against stored pool targets: the public loss and its config.

``partitioned_kd_loss`` (``PartitionedKDLoss`` as a module) checks its inputs once, then runs the
fused Triton kernel (``kernels.partitioned_kernel``) on CUDA tensors, or on CPU under the
interpreter, and the torch reference (``kernels.partitioned_reference``, which defines the rule
per row) otherwise. Eagerly the kernel runs through an autograd Function; traced by
``torch.compile``, through the registered op ``fastkd::partitioned_kd`` (``kernels.ops``), the
same launcher either way. The kernel writes the gradient in the forward pass; the backward
returns it (``common.forward_with_gradients``). ``partitioned_kd_trusted`` is the training loop's
call: no check the run has made already, a config made once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastkd.choices import PartitionMode, PartitionScore, Reduction
from fastkd.errors import ConfigError
from fastkd.kernels import common, ops
from fastkd.kernels.common import KDStats
from fastkd.kernels.partitioned_kernel import _partitioned_kd_kernel, launch_partitioned_kd
from fastkd.kernels.partitioned_reference import partitioned_kd_reference, plain_as_best
from fastkd.kernels.targets import PoolTargets
from fastkd.loss_settings import LossSettings


@dataclass(frozen=True)
class PartitionedKDConfig(common.KDLossConfig):
    """A partitioned KD loss call: the partition mode and score, and the student's own pool
    column."""

    mode: PartitionMode = PartitionMode.LIVE
    self_index: int | None = None
    partition_score: PartitionScore = PartitionScore.LABEL

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode is PartitionMode.FIXED and self.self_index is None:
            raise ConfigError("partition mode 'fixed' needs the student's pool column self_index")


def partitioned_kd_loss(
    student_logits: Tensor,
    labels: Tensor,
    targets: PoolTargets,
    settings: LossSettings | None = None,
    *,
    self_index: int | None = None,
    ignore_index: int = -100,
    inplace_grad: bool = False,
    max_block: int | None = None,
    scale: float = 1.0,
    grad_output_is_one: bool = False,
    mode: PartitionMode | str | None = None,
    partition_score: PartitionScore | str | None = None,
    temperature: float | None = None,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    reduction: Reduction | str | None = None,
) -> tuple[Tensor, KDStats]:
    """Partitioned KD loss of ``student_logits`` [B, C] against stored pool ``targets``.

    ``settings``: the loss's ``LossSettings`` (mode, partition_score, temperature, kd_weight,
    ce_weight, reduction); each of those given by keyword replaces the settings' own (for a
    caller without a settings object). ``plain`` mixes the teachers first
    (``PoolTargets.mixture``) and runs ``best`` on the mixture. Returns the loss (reduced, or
    [B] for ``reduction="none"``) and per-row ``KDStats``. ``self_index``: the student's own
    column (``fixed``). ``inplace_grad`` (Triton path) writes the gradient over the logits:
    saves B x C memory when the caller does not reuse them. ``max_block`` caps the tile width
    along C (tests force the multi-tile path with it). ``scale`` multiplies the loss and the
    gradient the kernel writes (training folds its mean over the global batch into it);
    ``grad_output_is_one`` is the caller's promise that it runs ``loss.backward()`` on this loss
    alone, so the backward returns the written gradient without the B x C rescale (a reduced
    loss only).
    """
    return _partitioned(student_logits, labels, targets, PartitionedKDConfig.from_call(locals()))


def partitioned_kd_trusted(
    student_logits: Tensor, labels: Tensor, targets: PoolTargets, config: PartitionedKDConfig
) -> tuple[Tensor, KDStats]:
    """``partitioned_kd_loss`` for a caller that has checked the labels (in [0, C) or
    ``ignore_index``, on the logits' device) and the targets (rows, classes, ids in range)
    itself, with a config it made once: ``fastkd train`` checks labels when the run is built and
    stored ids as the store reader decodes them, so a step runs no check again."""
    return _partitioned(student_logits, labels, targets, config, checked=True)


def _partitioned(
    student_logits: Tensor,
    labels: Tensor,
    targets: PoolTargets,
    config: PartitionedKDConfig,
    checked: bool = False,
) -> tuple[Tensor, KDStats]:
    """The loss of one call, its inputs checked once (``checked``: by the caller). Traced by
    ``torch.compile``: the registered op (``kernels.ops``). Eager: the kernel through a lean
    autograd Function (a custom op's Python dispatch costs tens of microseconds a call), or the
    torch reference."""
    student_logits = common.check_logits(student_logits, "student_logits")
    if not checked:
        common.check_labels(labels, student_logits, config.ignore_index)
        targets.check(*student_logits.shape, device=student_logits.device)
    if torch.compiler.is_compiling():
        return ops.partitioned_kd(student_logits, labels, targets, config)
    if common.triton_backend(_partitioned_kd_kernel, [student_logits]):
        targets, config = plain_as_best(targets, labels, student_logits.shape[1], config)
        return common.run_function(_PartitionedKDFunction, student_logits, labels, targets, config)
    return partitioned_kd_reference(student_logits, labels, targets, config)


class PartitionedKDLoss(common.KDLossModule):
    """``partitioned_kd_loss`` as a module: ``loss, stats = criterion(logits, labels, targets)``."""

    config_class = PartitionedKDConfig

    def forward(
        self, student_logits: Tensor, labels: Tensor, targets: PoolTargets
    ) -> tuple[Tensor, KDStats]:
        return _partitioned(student_logits, labels, targets, self.config)


class _PartitionedKDFunction(torch.autograd.Function):
    """Triton forward that writes the gradient (over the logits with ``inplace_grad``); backward
    scales it by grad_output (``common.scaled_gradients``)."""

    @staticmethod
    def forward(ctx, student_logits, labels, targets, config):
        grad = student_logits if config.inplace_grad else torch.empty_like(student_logits)
        outputs = launch_partitioned_kd(student_logits, grad, labels, targets, config)
        return common.forward_with_gradients(ctx, (grad,), outputs, labels, config)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        return *common.scaled_gradients(ctx, grad_loss), None, None, None
