"""The same numbers from the same command and seed on any machine of one kind: ``reproducible``.

The settings it pins (CPU code paths, deterministic algorithms, cuBLAS's workspace) and what it
reports of them; docs/method.md says why each one matters. torch is imported when it is entered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from fastkd.runtime.device import resolve_device

# Environment settings that pin the CPU code paths of torch (ATen), oneDNN and MKL to AVX2, so
# that two x86 machines with AVX2 compute the same floats whatever else they support (AVX-512
# machines otherwise take other kernels, with other rounding).
PINNED_CPU_PATHS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
}
CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to be deterministic (torch's docs)


@contextlib.contextmanager
def reproducible(device: str | None = "auto") -> Iterator[dict[str, Any]]:
    """Within: the same numbers from the same command and seed on any machine of one kind.

    Pins the CPU code paths (``PINNED_CPU_PATHS``; an explicit environment value wins), turns on
    torch's deterministic algorithms (warning, not failing, where an op has none) and on CUDA
    cuBLAS's deterministic workspace. The CPU paths are read when torch first computes, so enter
    this first thing in a process; on exit the environment and torch's flags are restored (a
    path already chosen stays chosen). Yields what holds, for the report: the CPU capability
    torch uses, its threads (results also depend on their number), the pinned settings.
    """
    import torch

    names = [*PINNED_CPU_PATHS, "CUBLAS_WORKSPACE_CONFIG"]
    saved = {name: os.environ.get(name) for name in names}
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    for name, value in PINNED_CPU_PATHS.items():
        os.environ.setdefault(name, value)
    if resolve_device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield {
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **{name: os.environ[name] for name in PINNED_CPU_PATHS},
        }
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
