"""How a launch cuts a row: the tile along C, its warps, the software-pipeline stages of the
whole-tile loops and the registers a thread may use, from a small table in each launcher
(``pick_tiling``). How many programs share the rows is ``kernels.row_grid``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastkd.errors import ConfigError

MAX_TILE = 4096
"""Widest tile along C: at 8 warps, 16 elements a thread (two 16-byte vectors of bf16), few
enough registers for two blocks per SM (``fastkd bench compile`` holds every launch to that)."""


def tile_width(num_classes: int, max_block: int | None) -> int:
    """Power-of-two tile along C: the whole row if it fits, at most ``max_block`` (or MAX_TILE)."""
    cap = MAX_TILE if max_block is None else max_block
    if cap < 16 or cap & (cap - 1):
        raise ConfigError(f"max_block must be a power of two >= 16, got {cap}")
    return min(_next_power_of_2(num_classes), cap)


def num_warps_for(block: int) -> int:
    """Warps for a tile of ``block`` columns: 8 up to the 4096-wide tile (16 elements a thread
    at most); Triton 3.8's ptxas spills a few bytes of the small-C kernels at 4."""
    return 4 if block <= 512 else 8 if block <= 4096 else 16


@dataclass(frozen=True)
class Tiling:
    """How a launch cuts its rows: the tile along C, its warps, the software-pipeline stages of
    the whole-tile loops (``tl.range(num_stages=...)``: stages - 1 tiles in flight as
    asynchronous copies while one is computed) and the registers a thread may use (ptxas's
    ``maxnreg``, None: ptxas's own choice, which sometimes stops at 64 or 128 registers and
    spills 4-8 bytes; given a cap, ptxas may use up to it)."""

    block: int
    num_warps: int
    stages: int
    max_registers: int | None


TileRule = tuple[int, int, int, int, int | None]
"""A row of a launcher's tile table: (up to this many element bytes, tile bytes of a model's row,
warps, stages, max registers); the first row whose bytes bound holds is taken."""


def pick_tiling(
    rules: Sequence[TileRule], num_classes: int, element_size: int, max_block: int | None
) -> Tiling:
    """The tiling of a launch from its launcher's table, by the widest element read a row
    (``element_size``): the rule's tile bytes as elements, the whole row if it is narrower. A
    caller's ``max_block`` caps the tile instead (warps then by ``num_warps_for``)."""
    _, tile_bytes, warps, stages, registers = next(
        (rule for rule in rules if element_size <= rule[0]), rules[-1]
    )
    if max_block is not None:
        block = tile_width(num_classes, max_block)
        warps = num_warps_for(block)
        if registers is not None:  # a cap the SM's 64K registers hold at these warps
            registers = min(registers, 65536 // (32 * warps) // 8 * 8)
        return Tiling(block, warps, stages, registers)
    block = tile_width(num_classes, max(16, tile_bytes // element_size))
    return Tiling(block, min(warps, num_warps_for(block)), stages, registers)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
