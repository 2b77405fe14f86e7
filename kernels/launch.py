"""Every kernel launch goes through ``launch``, so a dry run can collect launches instead.

``capture_launches`` is how the compile check (``fastkd.bench.compile``) sees exactly the
configurations the launchers pick (arguments, grid, constexprs, warps) at any shape, without a
GPU: it records each launch and runs nothing. ``CountOperations`` counts the tensor operations
around them that would each launch a kernel on a GPU (the host path's cost: ``bench host`` and
the three-operation test of a training call count with it).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its arguments and its launch options."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    options: dict[str, Any] = field(default_factory=dict)


_captured: list[Launch] | None = None


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)``, or, inside ``capture_launches``, its record."""
    if _captured is not None:
        _captured.append(Launch(kernel, grid, args, options))
        return
    kernel[grid](*args, **options)


@contextlib.contextmanager
def capture_launches() -> Iterator[list[Launch]]:
    """Record the launches made inside the block instead of running them (outputs stay empty)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


FREE_OPERATIONS = frozenset(
    {
        "aten::empty",
        "aten::empty_like",
        "aten::empty_strided",
        "aten::new_empty",
        "aten::new_empty_strided",
        "aten::detach",
        "aten::alias",
    }
)
"""Operations that launch no kernel on a GPU besides views (``OpOverload.is_view``): empty
allocations (the caching allocator hands out memory) and new tensors over the same memory."""
_BELOW_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class CountOperations(TorchDispatchMode):
    """Counts the aten operations dispatched inside it that would launch a GPU kernel (not
    views, not ``FREE_OPERATIONS``); fills, copies, casts, reductions, comparisons and arithmetic
    all count. It steps into fastkd's registered ops (``kernels.ops``) and counts their bodies:
    an op is not a place to hide work. CPU tensors only (the ops' bodies redispatch to CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.operations.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fastkd::"):
            with self:
                return func.redispatch(_BELOW_PYTHON, *args, **kwargs)
        if not (func.is_view or name in FREE_OPERATIONS):
            self.operations[name] += 1
        return func(*args, **kwargs)
