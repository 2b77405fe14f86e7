"""Every kernel launch goes through ``launch``, so a dry run can collect launches instead.

``capture_launches`` is how the compile check (``fastkd.bench.compile``) sees exactly the
configurations the launchers pick (arguments, grid, constexprs, warps) at any shape, without a
GPU: it records each launch and runs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


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
