"""The backward of a gradient written in the forward: one pass that scales it by grad_output.

``grad.mul_(grad_output)`` on a bf16 / fp16 gradient with an fp32 ``grad_output`` takes torch's
mixed-dtype elementwise path (no vector loads), several times slower on a GPU than a copy of the
same bytes (``bench/results/kernel-sweep-h200.json``); it also rounds the factor to the
gradient's dtype first. These kernels read the fp32 factor from device memory (no host sync),
multiply in fp32 and round once. A scalar factor on a contiguous gradient (the reduced losses)
walks it as one flat buffer: whole blocks without masks, so every access is 16 bytes wide
whatever B x C, then the remainder. A factor per row (``reduction="none"``), or rows with a
stride, take a (row, tile) grid with one factor load a program.
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
    """``grad`` [B, C] (unit stride along C) times ``factor``, in place: a scalar, or one value
    a row ([B]). Returns ``grad``."""
    num_rows, num_classes = grad.shape
    if factor.dim() == 0 and grad.is_contiguous():
        numel = grad.numel()
        whole = numel // BLOCK
        if whole:
            launch(_scale_flat_kernel, (whole,), grad, factor, numel, 0, EVEN=True, BLOCK=BLOCK,
                   num_warps=NUM_WARPS)  # fmt: skip
        if numel % BLOCK:
            launch(_scale_flat_kernel, (1,), grad, factor, numel, whole * BLOCK, EVEN=False,
                   BLOCK=BLOCK, num_warps=NUM_WARPS)  # fmt: skip
        return grad
    launch(
        _scale_rows_kernel,
        (num_rows, triton.cdiv(num_classes, BLOCK)),
        grad,
        grad.stride(0),
        factor,
        factor.stride(0) if factor.dim() else 0,
        num_classes,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return grad


if triton is not None:

    @triton.jit
    def _scale_flat_kernel(
        grad_ptr, factor_ptr, numel, start, EVEN: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        factor = tl.load(factor_ptr).to(tl.float32)
        if EVEN:  # a whole block: no mask, so the accesses vectorise
            grad = tl.load(grad_ptr + offsets)
            tl.store(grad_ptr + offsets, (grad.to(tl.float32) * factor).to(grad.dtype))
        else:
            mask = offsets < numel
            grad = tl.load(grad_ptr + offsets, mask=mask)
            tl.store(grad_ptr + offsets, (grad.to(tl.float32) * factor).to(grad.dtype), mask=mask)

    @triton.jit
    def _scale_rows_kernel(
        grad_ptr, row_stride, factor_ptr, factor_stride, num_classes, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < num_classes
        factor = tl.load(factor_ptr + row * factor_stride).to(tl.float32)
        pointers = grad_ptr + row * row_stride + columns
        grad = tl.load(pointers, mask=mask)
        tl.store(pointers, (grad.to(tl.float32) * factor).to(grad.dtype), mask=mask)
else:  # pragma: no cover
    _scale_flat_kernel = _scale_rows_kernel = None
