"""This process's place in a torchrun job: its rank, joining the job, work on the main rank only.

torchrun names the job in the environment (RANK, WORLD_SIZE, LOCAL_RANK); outside it a process
is rank 0 of 1. torch is imported inside the functions that join or talk to the job.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastkd.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank() -> int:
    """torchrun's LOCAL_RANK (0 outside torchrun): which of the node's GPUs is this process's."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device_kind: str) -> DistContext:
    """Join the torchrun job named by RANK / WORLD_SIZE / LOCAL_RANK (nccl on GPU, gloo on CPU)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank())


def join_job(device: torch.device) -> DistContext:
    """This process in its torchrun job (``init_distributed``), its GPU the current one (the
    job's collectives run there)."""
    import torch

    context = init_distributed(device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return context


def on_main(context: DistContext, action: Callable[[], None]) -> None:
    """Run ``action`` on the main rank only; if it fails, every rank raises (the others say the
    main rank stopped), so no rank waits forever at the job's next collective."""
    failure: BaseException | None = None
    if context.is_main:
        try:
            action()
        except Exception as error:  # shared with the other ranks, then raised here as it is
            failure = error
    if context.enabled:
        import torch.distributed as dist

        shared = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(shared, src=0)
        if failure is None and shared[0] is not None:
            raise ConfigError(f"the main rank stopped: {shared[0]}")
    if failure is not None:
        raise failure
