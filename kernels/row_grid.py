"""How many programs a KD launch runs: each takes rows p, p + G, p + 2G, ... of the B rows.

The partitioned and bidirectional kernels loop over rows (a program's rows in that order, so
the G rows in flight at any moment are G consecutive ones), and ``row_programs`` picks G from
the device's SM count and L2 size, read once per device (``device_limits``; on CPU, where the
interpreter runs and the compile check captures launches, H100 SXM's: ``DEFAULT_LIMITS``).
Pure Python on cached numbers: no tensor operation per call. Not measured on a GPU yet.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type hint only
    from fastkd.kernels.tiling import Tiling


@dataclass(frozen=True)
class DeviceLimits:
    """What the grid rule reads of a device: its SMs and its L2 cache's bytes."""

    sms: int
    l2_bytes: int


DEFAULT_LIMITS = DeviceLimits(sms=132, l2_bytes=50 * 2**20)
"""H100 SXM's (the design's roofline GPU): for launches on CPU tensors."""
SM_REGISTERS = 65536  # registers per SM on sm_80 and sm_90
SM_THREADS = 2048  # resident threads per SM on sm_80 and sm_90
WAVES = 4
"""Programs per resident slot where the rows in flight fit in L2: enough that a slot count
estimated too high (``Tiling``'s registers are a cap; ptxas may use fewer) costs at most a
quarter wave, and several rows a program at small C (8192 x 1000: about 8)."""


@functools.cache
def device_limits(device: torch.device) -> DeviceLimits:
    """The device's SMs and L2 bytes (``torch.cuda.get_device_properties``, once per device)."""
    if device.type != "cuda":
        return DEFAULT_LIMITS
    properties = torch.cuda.get_device_properties(device)
    return DeviceLimits(properties.multi_processor_count, properties.L2_cache_size)


def resident_blocks(tiling: Tiling) -> int:
    """Blocks of this tiling an SM holds at least: by its register cap (ptxas's ``maxnreg``)
    and by threads (without a cap, threads alone: ``WAVES`` absorbs the excess)."""
    threads = 32 * tiling.num_warps
    by_threads = SM_THREADS // threads
    if tiling.max_registers is None:
        return by_threads
    return max(1, min(by_threads, SM_REGISTERS // (tiling.max_registers * threads)))


def row_programs(num_rows: int, row_bytes: int, tiling: Tiling, device: torch.device) -> int:
    """The grid G = min(B, cap). ``row_bytes``: the bytes of one row that pass 1 and pass 2 both
    touch (the student's, and a dense teacher's or every model's row).

    Pass 2 re-reads a row right after pass 1 read it, so the re-read comes from L2 while the
    rows in flight (one a resident program) fit there. Where a full GPU's rows fit (SMs x
    resident blocks x ``row_bytes`` <= L2: C up to about 50 000 bf16 with a bf16 teacher on an
    H100), cap = ``WAVES`` x the resident slots: the GPU is filled and, at small C, each program
    takes several rows (fewer, longer programs instead of B launches of a few microseconds).
    Where they do not fit (8192 x 128 256: 102 rows of 513 KB in 50 MiB, 264 slots), cap = the
    rows that fit: fewer programs than slots, each keeping its row in L2 between the passes."""
    limits = device_limits(device)
    slots = limits.sms * resident_blocks(tiling)
    fit = limits.l2_bytes // max(1, row_bytes)
    cap = WAVES * slots if fit >= slots else fit
    return max(1, min(num_rows, cap))
