"""Compiling a captured launch for ``sm_<arch>`` without a GPU, and reading its machine code.

``compile_launch`` runs ``triton.compile`` (the JIT's specialisation included) through a
stand-in active driver that names the target; the Triton wheel's ptxas -v log and cuobjdump give
registers, spills and shared memory (``resource_usage``), the SASS's global load and store widths
and MUFU.EX2 count (``sass_counts``) and the asynchronous copies its loops issue
(``loop_async_copies``: how the software pipeline of ``tl.range(num_stages=...)`` shows in the
machine code); the TTGIR gives exps per row element (``loop_exps``) and the whole-tile loops
(``whole_tile_loops``), and the per-SM limits the resident blocks (``blocks_per_sm``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# Per-SM limits of the architectures checked: registers, threads, resident blocks, shared memory.
SM_LIMITS = {
    90: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 * 1024},
    80: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 * 1024},
}


_PTXAS_LOGS: dict[str, str] = {}  # compiled kernel hash -> the ptxas -v log of its compile


class _StandInDriver:
    """The active driver while compiling: it names the target and launches nothing."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        # One device per architecture: the JIT's per-device kernel caches keep each apart, so
        # one process compiles for several.
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def is_active(self) -> bool:
        return True


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_launch(launch: Any, arch: int) -> tuple[Any, str]:
    """``triton.compile`` of the recorded launch for ``sm_<arch>`` (JIT specialisation included)
    and the ``ptxas -v`` log of that compile (empty when the kernel came from a cache)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    previous = driver._active  # None until a driver was needed; reset_active would probe for one
    driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32)))
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v and prints its log
            # No line tables: nothing here reads them, and the same SASS compiles sooner.
            knobs.compilation.disable_line_info = True
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
    finally:
        driver._active = previous
    # A kernel the same process compiled before comes from Triton's cache without a new log.
    text = _PTXAS_LOGS.setdefault(compiled.metadata.hash, log.getvalue())
    return compiled, text


def resource_usage(cubin: bytes, ptxas_log: str) -> dict[str, int]:
    """Registers, stack, local memory and static shared memory of the cubin (its cuobjdump
    -res-usage), and the spill bytes of the ``ptxas -v`` log Triton's compile wrote."""
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", str(binary)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def number(pattern: str, text: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"REG:(\d+)", usage),
        "stack_bytes": number(r"STACK:(\d+)", usage),
        "local_bytes": number(r"LOCAL:(\d+)", usage),
        "shared_bytes": number(r"SHARED:(\d+)", usage),
        "spill_store_bytes": number(r"(\d+) bytes spill stores", ptxas_log),
        "spill_load_bytes": number(r"(\d+) bytes spill loads", ptxas_log),
    }


def sass_of(cubin: bytes) -> str:
    """The cubin's SASS (cuobjdump -sass)."""
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        return subprocess.run(
            [_tool("cuobjdump"), "-sass", str(binary)], capture_output=True, text=True, check=True
        ).stdout


def sass_counts(sass: str) -> tuple[dict[str, int], dict[str, int], int]:
    """Global loads (plain, and asynchronous copies to shared memory: LDGSTS) and stores by
    opcode (width) and the MUFU.EX2 count in the SASS."""
    loads = collections.Counter(re.findall(r"\b(LDG(?:STS)?\.E[.\w]*)", sass))
    stores = collections.Counter(re.findall(r"\b(STG\.E[.\w]*)", sass))
    return (
        dict(sorted(loads.items())),
        dict(sorted(stores.items())),
        len(re.findall(r"MUFU\.EX2", sass)),
    )


def loop_async_copies(sass: str) -> list[int]:
    """The asynchronous global-to-shared copies (LDGSTS) in each innermost loop of the SASS, in
    address order: a loop is a backward branch's span, from its target to the branch; a span
    that holds another (the kernels' row loop around its tile loops) is not counted. A pipelined
    tile loop issues the copies of a later tile while it computes this one (and waits on them
    with LDGDEPBAR / DEPBAR), so its span holds LDGSTS; a loop that loads only what it uses
    holds none."""
    code = [
        (int(address, 16), text)
        for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    spans = []
    for address, text in code:
        branch = re.search(r"\bBRA\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) <= address:
            spans.append((int(branch.group(1), 16), address))
    innermost = [
        (start, end)
        for start, end in spans
        if not any((s, e) != (start, end) and start <= s and e <= end for s, e in spans)
    ]
    return [
        sum(1 for address, text in code if start <= address <= end and "LDGSTS" in text)
        for start, end in sorted(innermost)
    ]


def _tile_loop_spans(ttgir: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The TTGIR's lines and the (first, last) line of each loop over a row's whole tiles: an
    innermost ``scf.for`` to a computed bound (a row's tile count; the masked ends' two-trip
    loop runs to a literal, and the row loop around the tile loops holds them)."""
    lines = ttgir.splitlines()
    loops, open_loops, depth = [], [], 0
    for index, line in enumerate(lines):
        loop = re.search(r"scf\.for %\S+ = %\S+ to (%\S+) step", line)
        if loop and line.rstrip().endswith("{"):
            open_loops.append((depth, index, loop.group(1)))
        depth += line.count("{") - line.count("}")
        while open_loops and depth <= open_loops[-1][0]:
            _, first, bound = open_loops.pop()
            loops.append((first, index, bound))
    spans = [
        (first, last)
        for first, last, bound in loops
        if not re.fullmatch(r"%c\d+_i\d+(_\d+)?", bound)
        and not any(first < f <= last for f, _, _ in loops)
    ]
    return lines, spans


def whole_tile_loops(ttgir: str) -> int:
    """The ``scf.for`` loops over a row's whole tiles in the TTGIR (``_tile_loop_spans``)."""
    return len(_tile_loop_spans(ttgir)[1])


def loop_exps(ttgir: str) -> int:
    """Exponentials per row element: the tensor-valued exp / exp2 ops inside the loops over
    whole tiles (each visits every element of a row's body once; the masked head and tail
    outside them are a few elements a row). Each lowers to one MUFU.EX2."""
    lines, spans = _tile_loop_spans(ttgir)
    return sum(
        1
        for first, last in spans
        for line in lines[first : last + 1]
        if re.search(r"= math\.exp2? %\S+ : tensor<", line)
    )


def blocks_per_sm(arch: int, registers: int, warps: int, shared: int) -> int:
    """Resident blocks per SM: registers (per-warp allocation in 256-register units), threads,
    the block limit and shared memory, whichever binds first."""
    limits = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * warps)
    by_threads = limits["threads"] // (32 * warps)
    by_shared = limits["shared"] // (shared + 1024) if shared else limits["blocks"]
    return min(by_registers, by_threads, limits["blocks"], by_shared)
