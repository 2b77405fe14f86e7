"""The KD losses registered with torch: ``fastkd::partitioned_kd`` and ``fastkd::bidirectional_kd``.

``torch.library`` custom ops, so ``torch.compile`` traces a model and its loss as one graph (the
op is opaque to it: the fake implementation gives its outputs' shapes). The public losses call
them only while ``torch.compile`` traces: eagerly they run the same launcher through an autograd
Function, which costs the host less than a custom op's Python dispatch. Each op takes tensors and one string: the targets flattened in
``TARGET_FIELDS`` order (optional tensors for absent fields, so a new field flows through), their
tail model, and the call's config as JSON (decoded once per distinct config). It returns the loss,
the per-row statistics as one fp32 [B, 4] (kl, p_student, p_teacher after the row loss's column:
custom ops may not return views of one buffer), ``chosen`` and the gradient the kernel wrote.

One implementation serves every device: the Triton launcher where ``common.triton_backend`` says
the kernel runs (CUDA, or CPU under ``TRITON_INTERPRET=1``), else the torch reference, whose
gradient autograd takes inside the op. Its autograd (``register_autograd``) keeps the written
gradient and scales it by grad_output in the backward, or passes it on with
``grad_output_is_one``; the statistics and the gradient output get no gradient (none is made).
``torch.library.triton_op`` is not used: the launchers go through ``kernels.launch.launch`` and the
bidirectional kernel takes tuples of tensors, which ``wrap_triton`` does not trace.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from fastkd.choices import PartitionMode, Reduction
from fastkd.kernels import common
from fastkd.kernels.bidirectional_kernel import _bidirectional_kd_kernel, launch_bidirectional_kd
from fastkd.kernels.bidirectional_reference import bidirectional_kd_reference
from fastkd.kernels.common import KDLossConfig, KDStats
from fastkd.kernels.partitioned_kernel import _partitioned_kd_kernel, launch_partitioned_kd
from fastkd.kernels.partitioned_reference import partitioned_kd_reference, plain_as_best
from fastkd.kernels.targets import TARGET_FIELDS, PoolTargets

if TYPE_CHECKING:  # type hints only: the configs' modules import this one
    from fastkd.kernels.bidirectional_kd import BidirectionalKDConfig
    from fastkd.kernels.partitioned_kd import PartitionedKDConfig


def partitioned_kd(
    student_logits: Tensor, labels: Tensor, targets: PoolTargets, config: PartitionedKDConfig
) -> tuple[Tensor, KDStats]:
    """``fastkd::partitioned_kd`` on checked inputs: (loss, KDStats)."""
    tensors = [getattr(targets, name) for name in TARGET_FIELDS]
    loss, stats, chosen, _grad = torch.ops.fastkd.partitioned_kd(
        student_logits, labels, tensors, _target_options(targets), _encode(config)
    )
    return loss, _stats(stats, chosen)


def bidirectional_kd(
    logits: Sequence[Tensor], labels: Tensor, config: BidirectionalKDConfig
) -> tuple[Tensor, KDStats]:
    """``fastkd::bidirectional_kd`` on checked inputs: (loss, KDStats)."""
    loss, stats, chosen, _grads = torch.ops.fastkd.bidirectional_kd(
        list(logits), labels, _encode(config)
    )
    return loss, _stats(stats, chosen)


_OPTION_FIELDS = tuple(
    f.name for f in dataclasses.fields(PoolTargets) if f.name not in TARGET_FIELDS
)


def _target_options(targets: PoolTargets) -> str:
    """The fields of ``targets`` that are not tensors (its tail model, ...) as JSON. A traced
    step guards on their values, not on the object: a new ``PoolTargets`` each step (stored
    targets) does not recompile it."""
    return _options_json(*(getattr(targets, name) for name in _OPTION_FIELDS))


@torch.compiler.assume_constant_result
def _options_json(*values: Any) -> str:
    return _json(tuple(zip(_OPTION_FIELDS, values, strict=True)))


@functools.lru_cache(maxsize=256)
def _json(items: tuple[tuple[str, Any], ...]) -> str:
    return json.dumps(dict(items))


@functools.lru_cache(maxsize=256)
def _options(text: str) -> dict[str, Any]:
    return json.loads(text)


def _stats(stats: Tensor, chosen: Tensor) -> KDStats:
    return KDStats(chosen, stats[:, 1], stats[:, 2], stats[:, 3])


def _encode(config: KDLossConfig) -> str:
    """A config as the ops' string argument: JSON of its class's name and fields (enums by
    value), made once by the config itself."""
    return config._op_key


@functools.lru_cache(maxsize=256)
def _decode(text: str) -> Any:
    """The config ``_encode`` wrote (its class: the ``KDLossConfig`` subclass of that name)."""
    fields = json.loads(text)
    kinds = {kind.__name__: kind for kind in KDLossConfig.__subclasses__()}
    return kinds[fields.pop("config")](**fields)


# -- the operators --------------------------------------------------------------------------------


@torch.library.custom_op("fastkd::partitioned_kd", mutates_args=())
def _partitioned_op(
    student_logits: Tensor,
    labels: Tensor,
    targets: list[Tensor | None],
    target_options: str,
    config: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, stats [B, 4], chosen [B], gradient [B, C]) of ``partitioned_kd_loss``."""
    cfg = _decode(config)
    tensors = dict(zip(TARGET_FIELDS, targets, strict=True))
    pool = PoolTargets(**tensors, **_options(target_options))
    if not common.triton_backend(_partitioned_kd_kernel, [student_logits]):
        loss, stats, chosen, (grad,) = _reference(
            lambda z: partitioned_kd_reference(z[0], labels, pool, cfg), [student_logits], cfg
        )
        return loss, stats, chosen, grad
    if cfg.mode is PartitionMode.PLAIN:
        pool, cfg = plain_as_best(pool, labels, student_logits.shape[1], cfg)
    grad = torch.empty_like(student_logits)
    outputs = launch_partitioned_kd(student_logits, grad, labels, pool, cfg)
    return *_kernel_outputs(outputs, labels, cfg), grad


@torch.library.custom_op("fastkd::bidirectional_kd", mutates_args=())
def _bidirectional_op(
    logits: list[Tensor], labels: Tensor, config: str
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(loss, stats [B, 4], chosen [B], each model's gradient) of ``bidirectional_kd_loss``."""
    cfg = _decode(config)
    if not common.triton_backend(_bidirectional_kd_kernel, logits):
        loss, stats, chosen, grads = _reference(
            lambda z: bidirectional_kd_reference(z, labels, cfg), logits, cfg
        )
        return loss, stats, chosen, [g.clone() for g in grads]  # may be views of one buffer
    grads = [torch.empty_like(z) for z in logits]
    outputs = launch_bidirectional_kd(logits, grads, labels, cfg)
    return *_kernel_outputs(outputs, labels, cfg), grads


@_partitioned_op.register_fake
def _partitioned_fake(student_logits, labels, targets, target_options, config):
    return *_fake_outputs(student_logits, config), torch.empty_like(student_logits)


@_bidirectional_op.register_fake
def _bidirectional_fake(logits, labels, config):
    grads = [torch.empty_like(z) for z in logits]
    return *_fake_outputs(logits[0], config), grads


def _fake_outputs(logits: Tensor, config: str) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, stats and chosen as the kernel (fp32) or the reference (fp64 for fp64) gives them."""
    num_rows = logits.shape[0]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    reduced = _decode(config).reduction is not Reduction.NONE
    loss = logits.new_empty(() if reduced else (num_rows,), dtype=dtype)
    stats = logits.new_empty((num_rows, 4), dtype=dtype)
    return loss, stats, logits.new_empty((num_rows,), dtype=torch.int64)


def _kernel_outputs(
    outputs: tuple[Tensor, ...], labels: Tensor, config: KDLossConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss, the [B, 4] statistics and chosen from a launcher's outputs."""
    row_loss, chosen, *others = outputs
    columns = (row_loss, *others)
    stats = row_loss.as_strided((row_loss.shape[0], 4), (4, 1))
    if any(  # not the launchers' stat_buffers [B, 4] (row loss, kl, p_student, p_teacher)
        t.untyped_storage().data_ptr() != stats.untyped_storage().data_ptr()
        or t.stride() != (4,)
        or t.storage_offset() != stats.storage_offset() + column
        for column, t in enumerate(columns)
    ):
        stats = torch.stack(columns, dim=1)
    loss = common.reduce_loss(row_loss, labels, config)
    if loss.untyped_storage().data_ptr() == stats.untyped_storage().data_ptr():
        loss = loss.clone()  # reduction "none" at scale 1: the row losses are a column of stats
    return loss, stats, chosen


def _reference(
    loss_of: Any, logits: Sequence[Tensor], config: KDLossConfig
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """The torch reference inside an op: its loss, statistics, chosen and, by autograd, the
    gradient each logits tensor gets (per row for ``reduction="none"``). Under inference mode, or
    on inference tensors, nothing can be differentiated: the loss alone, the gradients left
    unwritten (no backward will read them)."""
    if torch.is_inference_mode_enabled() or any(z.is_inference() for z in logits):
        loss, stats = loss_of(list(logits))
        return (
            loss,
            _table(loss, stats),
            stats.chosen.long(),
            tuple(torch.empty_like(z) for z in logits),
        )
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()  # the op runs below autograd: undo
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    include = torch._C._dispatch_tls_local_include_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        leaves = [z.detach().requires_grad_() for z in logits]
        loss, stats = loss_of(leaves)
        total = loss if loss.dim() == 0 else loss.sum()  # rows are independent
        grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return loss.detach(), _table(loss, stats), stats.chosen.long(), tuple(grads)


def _table(loss: Tensor, stats: KDStats) -> Tensor:
    """The reference's statistics as the op's [B, 4] (its first column is not read)."""
    columns = (stats.kl, stats.kl, stats.p_student, stats.p_teacher)
    return torch.stack([t.detach().to(loss.dtype) for t in columns], dim=1)


# -- autograd: the gradient was written in the forward ---------------------------------------------


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    ctx.set_materialize_grads(False)  # no zeros for the statistics' (absent) gradients
    _loss, stats, _chosen, grads = output
    grads = grads if isinstance(grads, list) else [grads]
    ctx.mark_non_differentiable(stats, *grads)
    ctx.save_for_backward(*grads)
    config = _decode(inputs[-1])
    ctx.reduction = config.reduction
    ctx.grad_output_is_one = config.grad_output_is_one


def _scaled(ctx: Any, grad_loss: Tensor) -> list[Tensor]:
    """The saved gradients times ``grad_loss``: in place on the tensors the kernel wrote (eager),
    out of place where the backward is traced (fake tensors: a graph mutates no saved tensor)."""
    # Detached: a tensor of its own, which autograd may hand to a leaf's .grad without a copy.
    grads = [g.detach() for g in ctx.saved_tensors]
    if ctx.grad_output_is_one and ctx.reduction is not Reduction.NONE:
        return grads
    if not any(is_fake(g) for g in grads):
        return [common.scale_grad_(g, grad_loss, ctx.reduction) for g in grads]
    factor = grad_loss.unsqueeze(1) if ctx.reduction is Reduction.NONE else grad_loss
    return [(g.float() * factor).to(g.dtype) for g in grads]


def _partitioned_backward(ctx: Any, grad_loss: Tensor, *_unused: Any) -> tuple[Any, ...]:
    return _scaled(ctx, grad_loss)[0], None, None, None, None


def _bidirectional_backward(ctx: Any, grad_loss: Tensor, *_unused: Any) -> tuple[Any, ...]:
    return _scaled(ctx, grad_loss), None, None


_partitioned_op.register_autograd(_partitioned_backward, setup_context=_setup_context)
_bidirectional_op.register_autograd(_bidirectional_backward, setup_context=_setup_context)
