"""Where a process runs and how it reports: device, ranks, autocast, progress bars, JSON form.

One home for each; dump, training, evaluation and the benchmarks use these. torch is imported
inside the functions that need it, so the torch-free parts (the store, ``fastkd inspect``) can
use the JSON form without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fastkd.errors import ConfigError

if TYPE_CHECKING:
    import torch

# ----------------------------------------------------------------------------------------------
# Ranks, devices and numerics


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


def machine_name(device: torch.device | str | None = None) -> str:
    """What results measured on ``device`` (default: ``resolve_device()``) are labelled with: the
    GPU's name and the host's cores, or the CPU's cores (and whether the host has a GPU)."""
    import torch

    cores = os.cpu_count()
    device = resolve_device() if device is None else torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores} CPU cores"
    return f"CPU, {cores} cores, " + ("GPU unused" if torch.cuda.is_available() else "no GPU")


# ----------------------------------------------------------------------------------------------
# Progress


class RateColumn(ProgressColumn):
    """Completed units per second (``unit``: steps, img)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = f"{speed:,.2f} {self.unit}/s" if speed else f"- {self.unit}/s"
        return Text(text, style="progress.data.speed")


def progress_bar(unit: str, *fields: ProgressColumn, enabled: bool = True) -> Progress:
    """A rich progress bar on stderr: description, bar, done/total, rate, ``fields``, elapsed and
    remaining time. Off (a no-op whose ``console.log`` still prints) when not ``enabled`` or not
    on a terminal, where a redrawn bar would only fill a log file."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # names as given
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *fields,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


# ----------------------------------------------------------------------------------------------
# JSON form


def json_default(value: Any) -> Any:
    """JSON form of the non-JSON values fastkd records: paths, enums, numpy scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if type(value).__module__ == "numpy":
        return value.tolist()  # numpy scalars and arrays (numpy imported only where they exist)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def plain(value: Any) -> Any:
    """JSON-normal form (tuples become lists, paths strings, numpy values Python numbers), so
    configs compare equal whether they were built here or read back from a file."""
    return json.loads(json.dumps(value, default=json_default))
