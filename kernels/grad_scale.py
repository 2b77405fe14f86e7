"""The backward of a gradient written in the forward: one pass that scales it by grad_output.

``grad.mul_(grad_output)`` on a bf16 / fp16 gradient with an fp32 ``grad_output`` takes torch's
mixed-dtype elementwise path (no vector loads), several times slower on a GPU than a copy of the
same bytes (``bench/results/kernel-sweep-h200.json``). This kernel reads the fp32 factor from
device memory (no host sync), multiplies in fp32, rounds once, and walks the gradient as one flat
buffer, so every tile is read and written with 16-byte accesses whatever the row length.
"""

from __future__ import annotations

from torch import Tensor

from fastkd.kernels.launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux-only dependency
    triton = None

BLOCK = 2048  # elements a program: 16 a thread at 4 warps (two 16-byte vectors of bf16)
NUM_WARPS = 4


def scale_rows_(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad`` [B, C] (contiguous, on the Triton path) times ``factor``, in place: a scalar, or
    one value a row ([B]). Returns ``grad``."""
    num_classes = grad.shape[1]
    per_row = factor.dim() > 0
    launch(
        _scale_kernel,
        (triton.cdiv(grad.numel(), BLOCK),),
        grad,
        factor,
        factor.stride(0) if per_row else 0,
        grad.numel(),
        num_classes,
        PER_ROW=per_row,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return grad


if triton is not None:

    @triton.jit
    def _scale_kernel(
        grad_ptr,
        factor_ptr,
        factor_stride,
        numel,
        num_classes,
        PER_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        if PER_ROW:
            factor = tl.load(factor_ptr + (offsets // num_classes) * factor_stride, mask=mask)
        else:
            factor = tl.load(factor_ptr)
        grad = tl.load(grad_ptr + offsets, mask=mask)
        scaled = grad.to(tl.float32) * factor.to(tl.float32)
        tl.store(grad_ptr + offsets, scaled.to(grad_ptr.dtype.element_ty), mask=mask)
