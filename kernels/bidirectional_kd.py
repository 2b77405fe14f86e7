"""Live bidirectional KD for N models trained together: the public loss and its config.

``bidirectional_kd_loss`` (``BidirectionalKDLoss`` as a module) checks its inputs once, then runs
the fused Triton kernel (``kernels.bidirectional_kernel``) on CUDA tensors, or on CPU under the
interpreter, and the torch reference (``kernels.bidirectional_reference``, which defines the rule
per row) otherwise; eagerly through an autograd Function, traced by ``torch.compile`` through the
registered op ``fastkd::bidirectional_kd`` (``kernels.ops``). The kernel writes every model's
gradient in the forward pass; the backward returns them. ``bidirectional_kd_trusted`` is the
training loop's call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastkd.choices import Reduction
from fastkd.errors import ConfigError
from fastkd.kernels import common, ops
from fastkd.kernels.bidirectional_kernel import _bidirectional_kd_kernel, launch_bidirectional_kd
from fastkd.kernels.bidirectional_reference import bidirectional_kd_reference
from fastkd.kernels.common import KDStats
from fastkd.loss_settings import LossSettings


@dataclass(frozen=True)
class BidirectionalKDConfig(common.KDLossConfig):
    """A joint KD loss call of N models: whether the teaching model gets the KL's gradient."""

    stop_grad: bool = True


def bidirectional_kd_loss(
    logits: Sequence[Tensor],
    labels: Tensor,
    settings: LossSettings | None = None,
    *,
    ignore_index: int = -100,
    inplace_grad: bool = False,
    max_block: int | None = None,
    scale: float = 1.0,
    grad_output_is_one: bool = False,
    temperature: float | None = None,
    stop_grad: bool | None = None,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    reduction: Reduction | str | None = None,
) -> tuple[Tensor, KDStats]:
    """Joint KD loss of N >= 2 models' ``logits`` (each [B, C]) on the same rows.

    ``settings``: the loss's ``LossSettings`` (temperature, stop_grad, kd_weight, ce_weight,
    reduction; the partition is always the label's, p(y)); each of those given by keyword
    replaces the settings' own. ``ignore_index``, ``inplace_grad``, ``max_block``, ``scale`` and
    ``grad_output_is_one`` say how this call runs, as for ``partitioned_kd_loss``.
    Returns the loss summed over the models (reduced over rows, or [B] for ``"none"``) and
    ``KDStats``: chosen = the teaching model (-1: none), kl = the row's summed KL, p_teacher = the
    best p(y), p_student = the most confident learner's p(y). ``scale`` multiplies the loss and
    the gradients the kernel writes (training folds its mean over the global batch into it);
    ``grad_output_is_one`` is the caller's promise that it runs ``loss.backward()`` on this loss
    alone, so the backward returns the written gradients without the B x C rescale (a reduced
    loss only).
    """
    return _bidirectional(logits, labels, BidirectionalKDConfig.from_call(locals()))


def bidirectional_kd_trusted(
    logits: Sequence[Tensor], labels: Tensor, config: BidirectionalKDConfig
) -> tuple[Tensor, KDStats]:
    """``bidirectional_kd_loss`` for a caller that has checked the labels itself, with a config
    it made once (``fastkd train``: labels checked when the run is built)."""
    return _bidirectional(logits, labels, config, checked=True)


def _bidirectional(
    logits: Sequence[Tensor], labels: Tensor, config: BidirectionalKDConfig, checked: bool = False
) -> tuple[Tensor, KDStats]:
    """The loss of one call, its inputs checked once (``checked``: the labels by the caller).
    Traced by ``torch.compile``: the registered op (``kernels.ops``); eager: the kernel through
    a lean autograd Function, or the torch reference (as ``partitioned_kd``'s)."""
    if len(logits) < 2:
        raise ConfigError(f"bidirectional KD needs at least 2 models, got {len(logits)}")
    logits = [common.check_logits(z, f"logits[{m}]") for m, z in enumerate(logits)]
    for m, z in enumerate(logits[1:], start=1):
        if z.shape != logits[0].shape or z.device != logits[0].device:
            raise ConfigError(
                f"logits[{m}] is {tuple(z.shape)} on {z.device}, "
                f"logits[0] is {tuple(logits[0].shape)} on {logits[0].device}"
            )
    if not checked:
        common.check_labels(labels, logits[0], config.ignore_index)
    if torch.compiler.is_compiling():
        return ops.bidirectional_kd(logits, labels, config)
    if common.triton_backend(_bidirectional_kd_kernel, logits):
        return common.run_function(_BidirectionalKDFunction, labels, config, *logits)
    return bidirectional_kd_reference(logits, labels, config)


class BidirectionalKDLoss(common.KDLossModule):
    """``bidirectional_kd_loss`` as a module: ``loss, stats = criterion([za, zb], labels)``."""

    config_class = BidirectionalKDConfig

    def forward(self, logits: Sequence[Tensor], labels: Tensor) -> tuple[Tensor, KDStats]:
        return _bidirectional(logits, labels, self.config)


class _BidirectionalKDFunction(torch.autograd.Function):
    """Triton forward that writes every model's gradient (over its logits with ``inplace_grad``);
    backward scales them by grad_output (``common.scaled_gradients``)."""

    @staticmethod
    def forward(ctx, labels, config, *logits):
        grads = tuple(z if config.inplace_grad else torch.empty_like(z) for z in logits)
        outputs = launch_bidirectional_kd(logits, grads, labels, config)
        return common.forward_with_gradients(ctx, grads, outputs, labels, config)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        return None, None, *common.scaled_gradients(ctx, grad_loss)
