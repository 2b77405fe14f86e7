"""What the KD kernels share: statistics, reductions, dispatch and the gradient-in-forward rule.

Dispatch (checked at call time): the Triton kernel on CUDA tensors; the same kernel under the Triton
interpreter on CPU when ``TRITON_INTERPRET=1`` (it must already be set when ``fastkd.kernels`` is
imported, since ``triton.jit`` reads it at decoration time); otherwise the torch reference, which is
plain autograd math.

On the Triton path the forward writes d(loss)/d(logits) into a buffer in the logits' dtype (or into
the logits themselves with ``inplace_grad=True``), already divided by the number of counted rows
for ``reduction="mean"`` and multiplied by the config's ``scale``; autograd's backward only
scales it by ``grad_output`` in place, or, with ``grad_output_is_one=True`` (the caller runs
``loss.backward()`` on this loss alone), returns it as written: no B x C pass and no host sync.
So backward through the same graph twice (``retain_graph=True``) is not supported on that path.

Input checks never wait on the device: a value check (labels, top-k ids in range) is one
``torch._assert_async`` on CUDA tensors, which fails the stream if it does not hold; on CPU
tensors it raises ``ConfigError`` at once (``assert_all``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from fastkd.choices import Reduction
from fastkd.errors import ConfigError
from fastkd.kernels import grad_scale
from fastkd.loss_settings import LOSS_FIELDS, LossSettings

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None
    InterpretedFunction = None


@dataclass
class KDStats:
    """Per-row diagnostics of a KD loss call, detached. Ignored rows: chosen -1, zeros elsewhere.

    chosen: the pool member (or model) whose distribution was the target, NO_TEACHER (-1) if none.
    kl: KL(p_target || p_student) at the loss temperature, before T^2 and weights (0 if none).
    p_student: the learner's p(y) at T = 1 (partitioned KD with the ``confidence`` score: its
        max_c p(c), what the partition compared).
    p_teacher: the best teacher's p(y) at T = 1 (``confidence``: its max_c p(c)), the probability
        the partition compared; for ``plain``, the teachers' mixture's.
    """

    chosen: Tensor
    kl: Tensor
    p_student: Tensor
    p_teacher: Tensor


@dataclass(frozen=True)
class KDLossConfig:
    """What a KD loss call takes besides its tensors: the fields of its ``LossSettings``
    (temperature, weights, reduction here; each loss's config adds the ones it reads), checked
    by ``LossSettings`` (one rule each), and how this call runs."""

    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    ignore_index: int = -100
    reduction: Reduction = Reduction.MEAN
    inplace_grad: bool = False  # Triton path: write the gradient over the logits
    max_block: int | None = None  # widest tile along C; None: the kernel's own choice
    scale: float = 1.0  # multiplies the (reduced) loss and the gradient the kernel writes
    # The caller back-propagates this loss alone with loss.backward(), so its grad_output is
    # exactly 1: backward returns the kernel's gradient without the B x C rescale.
    grad_output_is_one: bool = False

    def __post_init__(self) -> None:
        checked = self.settings  # LossSettings checks and types the loss's fields
        for name in {f.name for f in fields(self)}.intersection(LOSS_FIELDS):
            object.__setattr__(self, name, getattr(checked, name))
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale must be finite, got {self.scale}")
        if self.grad_output_is_one and self.reduction is Reduction.NONE:
            raise ConfigError(
                "grad_output_is_one needs a reduced loss (reduction 'mean' or 'sum'): "
                "loss.backward() takes a scalar"
            )
        # The registered ops' string argument (``kernels.ops``), made here once: a compiled
        # step reads it as a constant instead of tracing its making.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        object.__setattr__(self, "_op_key", json.dumps({"config": type(self).__name__, **values}))

    @property
    def settings(self) -> LossSettings:
        """The loss settings this config holds (the others at their defaults)."""
        own = {name: getattr(self, name) for name in LOSS_FIELDS if hasattr(self, name)}
        return LossSettings(**own)

    @classmethod
    def of(cls: type[Config], settings: LossSettings | None, **given: Any) -> Config:
        """The config of one call: ``settings`` (default ``LossSettings()``), the settings
        given by keyword (not None) over them, and the call's own fields."""
        base = settings or LossSettings()
        values = {f.name: getattr(base, f.name) for f in fields(cls) if f.name in LOSS_FIELDS}
        values |= {k: v for k, v in given.items() if v is not None or k not in LOSS_FIELDS}
        return cls(**values)

    @classmethod
    def from_call(cls: type[Config], arguments: Mapping[str, Any]) -> Config:
        """The config of a loss function's call from its arguments (``locals()``): its
        ``settings`` and the keyword arguments that are this config's fields."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in arguments.items() if k in names}
        return cls.of(arguments.get("settings"), **given)


Config = TypeVar("Config", bound=KDLossConfig)


class KDLossModule(nn.Module):
    """A KD loss as a module: the config is fixed at construction, the tensors per call."""

    config_class: ClassVar[type[KDLossConfig]]

    def __init__(self, settings: LossSettings | None = None, **given: Any) -> None:
        super().__init__()
        self.config = self.config_class.of(settings, **given)

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}={getattr(self.config, f.name)}" for f in fields(self.config))


def stat_buffers(num_rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Empty per-row outputs of a kernel: fp32 [B, 4] (row loss, kl, p_student, p_teacher, as
    ``store_row_stats`` writes them) and chosen [B] int64."""
    stats = torch.empty(num_rows, 4, device=device, dtype=torch.float32)
    return stats, torch.empty(num_rows, device=device, dtype=torch.int64)


def row_outputs(stats: Tensor, chosen: Tensor) -> tuple[Tensor, ...]:
    """The launchers' outputs from ``stat_buffers``: row loss, chosen, kl, p_student, p_teacher."""
    return stats[:, 0], chosen, stats[:, 1], stats[:, 2], stats[:, 3]


def forward_with_gradients(
    ctx: Any,
    grads: tuple[Tensor, ...],
    outputs: tuple[Tensor, ...],
    labels: Tensor,
    config: KDLossConfig,
) -> tuple[Tensor, ...]:
    """An autograd forward whose kernel wrote ``grads``: keep them for ``scaled_gradients`` and
    return the reduced loss and the four stats (not differentiable)."""
    row_loss, *stats = outputs
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the stats (never used)
    ctx.save_for_backward(*(g.detach() for g in grads))
    ctx.reduction = config.reduction
    ctx.grad_output_is_one = config.grad_output_is_one
    ctx.mark_non_differentiable(*stats)
    return reduce_loss(row_loss, labels, config), *stats


def run_function(function: type[torch.autograd.Function], *args: Any) -> tuple[Tensor, KDStats]:
    """``function.apply(*args)`` (loss, chosen, kl, p_student, p_teacher) as (loss, KDStats)."""
    loss, *stats = function.apply(*args)
    return loss, KDStats(*stats)


def kernel_scalars(config: KDLossConfig) -> tuple[int, float, float, float, float]:
    """The scalar arguments every KD kernel takes, in its order: ignore_index, 1 / T, T,
    kd_weight, ce_weight."""
    temperature = float(config.temperature)
    return (
        config.ignore_index,
        1.0 / temperature,
        temperature,
        float(config.kd_weight),
        float(config.ce_weight),
    )


def scaled_gradients(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, ...]:
    """The backward of ``forward_with_gradients``: the saved gradients times ``grad_loss``,
    detached (a tensor of its own, which autograd hands to a leaf's ``.grad`` without a copy)."""
    return tuple(
        scale_grad_(g.detach(), grad_loss, ctx.reduction, ctx.grad_output_is_one)
        for g in ctx.saved_tensors
    )


def triton_backend(kernel: object, tensors: Sequence[Tensor]) -> bool:
    """Whether ``kernel`` runs on ``tensors``: CUDA, or CPU under the Triton interpreter; fp64
    inputs always take the torch reference (the exact check)."""
    if triton is None or any(t.dtype == torch.float64 for t in tensors):
        return False
    tensor = tensors[0]
    if tensor.is_cuda:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1" or tensor.device.type != "cpu":
        return False
    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after fastkd.kernels was imported; set it before the "
            "import to run the Triton kernels on CPU, or unset it to use the torch reference"
        )
    return True


def check_labels(labels: Tensor, logits: Tensor, ignore_index: int) -> None:
    """Labels [B] of integers on the logits' device, in [0, C) or ignore_index."""
    num_rows, num_classes = logits.shape
    if labels.device != logits.device:
        raise ConfigError(f"labels are on {labels.device}, the logits on {logits.device}")
    if labels.shape != (num_rows,):
        raise ConfigError(f"labels must be [{num_rows}], got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integers, got {labels.dtype}")
    in_range = (labels >= 0) & (labels < num_classes)
    assert_all(
        in_range | (labels == ignore_index),
        f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}",
    )


def assert_all(ok: Tensor, message: str) -> None:
    """Every entry of the bool tensor ``ok`` holds, else ``message``, without a host sync on
    CUDA: there, one ``torch._assert_async`` fails the stream (a device-side assert: the CUDA
    context is then unusable, as after any device assert). On CPU: ``ConfigError(message)`` at
    once (the check runs in C++, where reading a CPU tensor waits on nothing)."""
    holds = ok.all()
    if holds.is_cuda:
        torch._assert_async(holds, message)  # queued: nothing waits for it
        return
    try:
        torch._assert_async(holds, message)
    except RuntimeError:
        raise ConfigError(message) from None


def check_logits(logits: Tensor, name: str) -> Tensor:
    """A [B, C] floating tensor with unit stride along C (copied only if it is not)."""
    if logits.dim() != 2:
        raise ConfigError(f"{name} must be [B, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ConfigError(f"{name} must be fp32, bf16 or fp16, got {logits.dtype}")
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def reduce_rows(
    row_loss: Tensor, labels: Tensor, ignore_index: int, reduction: Reduction
) -> Tensor:
    """Apply ``reduction`` to per-row losses (ignored rows already hold 0)."""
    if reduction is Reduction.NONE:
        return row_loss
    if reduction is Reduction.SUM:
        return row_loss.sum()
    return row_loss.sum() / counted_rows(labels, ignore_index)


def reduce_loss(row_loss: Tensor, labels: Tensor, config: KDLossConfig) -> Tensor:
    """The loss a KD function returns: the config's reduction of the row losses, times its
    ``scale`` (the kernel path and the torch reference alike). A scaled sum, training's, is one
    operation: the row losses' dot product with ``scale`` a row."""
    if config.reduction is Reduction.SUM and config.scale != 1.0:
        weights = constant(config.scale, row_loss.shape, row_loss.dtype, row_loss.device)
        return torch.dot(row_loss, weights)
    loss = reduce_rows(row_loss, labels, config.ignore_index, config.reduction)
    return loss if config.scale == 1.0 else loss * config.scale


@functools.lru_cache(maxsize=64)
def constant(
    value: float, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A tensor of ``value``, made once per (value, shape, dtype, device) and kept (a training
    run's steps share one): read it, never write it. Made outside inference mode, so autograd
    may save it."""
    with torch.inference_mode(False):
        return torch.full(shape, float(value), dtype=dtype, device=device)


def counted_rows(labels: Tensor, ignore_index: int) -> Tensor:
    """Number of non-ignored rows as an fp32 scalar tensor, at least 1 (no host sync)."""
    return (labels != ignore_index).sum().clamp_min(1).float()


def row_scale(
    labels: Tensor, ignore_index: int, reduction: Reduction, scale: float = 1.0
) -> Tensor:
    """[1] fp32 factor the kernels bake into the gradient: ``scale`` / counted rows for mean,
    else ``scale`` (the config's ``scale``; made on the device, no host sync; kept per scale
    and device, ``constant``)."""
    if reduction is Reduction.MEAN:
        factor = counted_rows(labels, ignore_index).reciprocal().reshape(1)
        return factor if scale == 1.0 else factor * scale
    return constant(scale, (1,), torch.float32, labels.device)


def scale_grad_(
    grad: Tensor, grad_output: Tensor, reduction: Reduction, grad_output_is_one: bool = False
) -> Tensor:
    """Backward of a loss whose gradient was written in the forward: scale it by grad_output.

    ``grad_output_is_one`` (the caller's promise that it runs ``loss.backward()`` on this loss
    alone) returns the gradient as written: no B x C pass, and no look at grad_output's value.
    """
    if grad_output_is_one and reduction is not Reduction.NONE:
        return grad
    if grad.stride(-1) == 1 and triton_backend(grad_scale._scale_flat_kernel, [grad]):
        return grad_scale.scale_rows_(grad, grad_output)  # one pass, fp32 factor, one rounding
    factor = grad_output.unsqueeze(1) if reduction is Reduction.NONE else grad_output
    return grad.copy_(grad.float() * factor)  # the same rounding as the kernel


# ----------------------------------------------------------------------------------------------
# What the kernels' launchers and bodies share


T_OTHER, T_UNIT, T_HALF = 0, 1, 2
"""Temperature codes: T = 1 and T = 2 get their own compiled paths (fewer exps per element)."""
_TEMPERATURE_CODES = {1.0: T_UNIT, 2.0: T_HALF}  # plain ints: the kernels see them as constexprs

if triton is not None:
    import triton.language as tl

    LOG2E = tl.constexpr(1.4426950408889634)
    STREAM = tl.constexpr("evict_first")  # the eviction hint of a store not read again here
    LN2 = tl.constexpr(0.6931471805599453)
    T_UNIT = tl.constexpr(T_UNIT)
    T_HALF = tl.constexpr(T_HALF)

    @triton.jit
    def split_row(row_offset, num_classes, VEC: tl.constexpr, BLOCK_C: tl.constexpr):
        """A row's columns as the kernels read them: a head up to the first 16-byte boundary
        (element offset ``row_offset`` of the row's start, VEC elements per 16 bytes), whole
        tiles of BLOCK_C read without masks, a tail; returns (head, full tiles, tail start)."""
        head = tl.minimum((VEC - row_offset % VEC) % VEC, num_classes)
        full_tiles = (num_classes - head) // BLOCK_C
        return head, full_tiles, head + full_tiles * BLOCK_C

    @triton.jit
    def store_row_stats(stats_ptr, chosen_ptr, row, row_loss, chosen, kl, p_student, p_teacher):
        """A row's outputs into the ``stat_buffers``."""
        tl.store(stats_ptr + row * 4, row_loss)
        tl.store(stats_ptr + row * 4 + 1, kl)
        tl.store(stats_ptr + row * 4 + 2, p_student)
        tl.store(stats_ptr + row * 4 + 3, p_teacher)
        tl.store(chosen_ptr + row, chosen.to(tl.int64))


def temperature_code(temperature: float) -> int:
    """``T_UNIT`` for T = 1, ``T_HALF`` for T = 2, else ``T_OTHER``."""
    return _TEMPERATURE_CODES.get(float(temperature), T_OTHER)


def unit_last_stride(tensor: Tensor) -> Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def vector_width(tensor: Tensor) -> int:
    """Elements of ``tensor`` per 16 bytes when its storage is 16-byte aligned, else 1: the
    kernels cut each row at its first 16-byte boundary and read whole tiles with vector loads."""
    if tensor.data_ptr() % 16 or 16 % tensor.element_size():
        return 1
    return 16 // tensor.element_size()


def aligned_width(other: Tensor, student: Tensor, vec: int, strides: Sequence[int]) -> int:
    """The vector width (elements of ``other`` per 16 bytes) at which every row of ``other`` is
    aligned where the student's rows are (``vec``: the student's), or 1 when it is not.

    The kernels start the unmasked tiles of a row at ``head = -(row * student_stride) mod vec``.
    ``other``'s offset there, ``row * strides[0] + member * strides[1:] + head``, is a multiple
    of its own width ``w`` for every row and member when its storage is 16-byte aligned, ``w``
    divides ``vec``, its row stride is the student's modulo ``w`` and its member strides are
    multiples of ``w``: only then may the kernel promise ``tl.multiple_of(offset, w)``."""
    width = vector_width(other)
    if vec == 1 or width == 1 or vec % width:
        return 1
    row_stride, *member_strides = strides
    same_phase = (row_stride - student.stride(0)) % width == 0
    return width if same_phase and all(stride % width == 0 for stride in member_strides) else 1
