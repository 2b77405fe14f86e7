"""Which device a process computes on (``--device``, or this rank's GPU), its autocast and the
memory layout its models and images take there.

torch is imported inside the functions, so ``import fastkd.runtime`` stays free of it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from fastkd.errors import ConfigError
from fastkd.runtime.job import local_rank

if TYPE_CHECKING:
    import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or None): this rank's GPU (cuda:LOCAL_RANK) when there is one, else the CPU.
    ``cuda`` without an index also means this rank's GPU."""
    import torch

    if name is None or name == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"--device {name!r} is not a device fastkd runs on: give auto, cpu, cuda or cuda:N"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: this machine has no Apple GPU that torch can use")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name}: this machine has no CUDA GPU that torch can use; give cpu (or auto)"
        )
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; a no-op elsewhere (CPU runs fp32 for exact, portable results)."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fast_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU: cuDNN's bf16 convolutions run NHWC on tensor cores, and an NCHW
    model transposes every activation to get there. Elsewhere the default layout (the CPU's
    convolutions are tuned for it, and CPU results stay exactly as tested)."""
    import torch

    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def in_fast_layout(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images [b, c, h, w] in ``fast_memory_format(device)`` (one copy on a GPU,
    where the loader hands NCHW; none elsewhere)."""
    import torch

    if device.type == "cuda" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images
