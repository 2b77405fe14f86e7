"""Compile check of the KD kernels for GPUs, without a GPU: registers, spills, loads, exps.

``fastkd bench compile [--arch 90,80] [--shapes ...] [--out DIR]``. For every configuration the
launchers pick at the benchmark shapes, each KD one at T = 1 and 2 with bf16 and fp32 logits
(dense teachers in fp16 / bf16 / fp32, with and without their lse at T given, top-k 10 and 100
with int32 / int64 ids, partition modes live / fixed / best; at the benchmark shape
4096 x 32000 also plain KD (the teachers' mixture: one fp32 column read as best) and live with
the label-free confidence score; bidirectional N = 2, 3, 4 with stop_grad on and off; the
backward's grad_output scale pass on bf16 / fp16 / fp32 gradients, per row at 4096 x 32000, its
masked remainder at 33 x 21841), it
records the launch the launcher makes on CPU tensors of that shape
(``kernels.launch.capture_launches``), compiles it with ``triton.compile`` for the target through
a stand-in active driver, runs the wheel's ptxas -v (registers, spills, shared memory) and reads
the SASS with its cuobjdump (global load and store widths, MUFU.EX2 per element, the
asynchronous copies in each loop: the software pipeline's loads ahead). Each distinct kernel is
compiled and read once: many configurations compile to the same one (shapes are not
specialised on), and they share its record (``kernel_hash``). It fails on a compile
error, a spill or stack frame, fewer than two blocks per SM, or a KD kernel's whole-tile loop
without asynchronous copies (``problems``). One JSON per
architecture, ``bench/results/compile-sm<arch>.json``. Triton must not be in interpreter mode
(the command clears TRITON_INTERPRET for itself).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fastkd.bench.compile_configs import Config, capture, configurations
from fastkd.bench.compile_sass import (
    blocks_per_sm,
    compile_launch,
    loop_async_copies,
    loop_exps,
    resource_usage,
    sass_counts,
    sass_of,
    whole_tile_loops,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = "256x1000,1024x21841,4096x32000,8192x128256"


@dataclass
class Result:
    """What the check records of one configuration compiled for one architecture."""

    config: Config
    arch: int
    ok: bool = True
    error: str = ""
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 0
    registers: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0  # local memory a thread uses: where spills go
    shared_bytes: int = 0
    blocks_per_sm: int = 0
    loads: dict[str, int] = field(default_factory=dict)  # SASS LDG opcodes by width
    stores: dict[str, int] = field(default_factory=dict)  # SASS STG opcodes by width
    mufu_ex2: int = 0  # MUFU.EX2 in the whole SASS (the masked head and tail included)
    ex2_per_element: float = 0.0  # exps per row element: tensor exps in the whole-tile loops
    whole_tile_loops: int = 0  # the TTGIR's loops over a row's whole tiles
    loop_async_copies: list[int] = field(default_factory=list)  # LDGSTS in each SASS loop
    compile_seconds: float = 0.0  # 0 where the record is another configuration's (kernel_hash)
    kernel_hash: str = ""  # the compiled kernel's: configurations sharing it share one compile

    @property
    def pipelined_loops(self) -> int:
        """SASS loops that issue asynchronous copies (the software pipeline's loads ahead)."""
        return sum(1 for copies in self.loop_async_copies if copies)


def check(config: Config, arch: int, checked: dict[str, Result] | None = None) -> Result:
    """One configuration compiled for ``arch`` and its machine code read. ``checked``: the
    records made so far by compiled kernel hash; a configuration whose launch compiles to one
    of them (the launchers' shapes and strides are not specialised on, so e.g. 8192 x 128256
    compiles to 4096 x 32000's kernel) takes its record: Triton's own cache returns the kernel,
    and its SASS is not read again."""
    result = Result(config, arch)
    start = time.perf_counter()
    try:
        launch = capture(config)
        compiled, ptxas_log = compile_launch(launch, arch)
    except Exception as error:  # a compile error is a result, recorded and reported
        result.ok = False
        result.error = f"{type(error).__name__}: {error}"[:2000]
        return result
    result.compile_seconds = round(time.perf_counter() - start, 2)
    result.kernel_hash = compiled.metadata.hash
    if checked is not None and result.kernel_hash in checked:
        return replace(checked[result.kernel_hash], config=config, compile_seconds=0.0)
    result.constexprs = {
        k: v for k, v in launch.options.items() if isinstance(v, int | bool | float | str)
    }
    result.num_warps = compiled.metadata.num_warps
    cubin = compiled.asm["cubin"]
    for key, value in resource_usage(cubin, ptxas_log).items():
        setattr(result, key, value)
    result.shared_bytes = max(result.shared_bytes, compiled.metadata.shared)
    sass = sass_of(cubin)
    result.loads, result.stores, result.mufu_ex2 = sass_counts(sass)
    result.loop_async_copies = loop_async_copies(sass)
    result.whole_tile_loops = whole_tile_loops(compiled.asm["ttgir"])
    # per element of each model's row (the partitioned kernel: of the student's, with its
    # teacher's matching element); one kernel serves one model count (a constexpr)
    result.ex2_per_element = loop_exps(compiled.asm["ttgir"]) / max(1, config.models)
    result.blocks_per_sm = blocks_per_sm(
        arch, result.registers, result.num_warps, result.shared_bytes
    )
    if checked is not None:
        checked[result.kernel_hash] = result
    return result


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]


_CHECKED: dict[str, Result] = {}  # a compiling process's records, by compiled kernel hash


def check_group(arch: int, configs: list[Config]) -> list[Result]:
    """Configurations compiled for one architecture in a compiling process, each distinct
    kernel compiled and read once per process (``check``'s ``checked``, kept across groups;
    Triton's kernel cache keeps each architecture apart: ``compile_sass.compile_launch``)."""
    return [check(config, arch, _CHECKED) for config in configs]


def compile_groups(configs: list[Config]) -> list[list[int]]:
    """The configurations' indices grouped by their launch at no shape (``Config.launched``):
    a group's launches compile to one kernel, so one process takes the group and compiles and
    reads it once."""
    groups: dict[Config, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(config.launched, []).append(index)
    return list(groups.values())


MIN_BLOCKS_PER_SM = 2
PIPELINED_KERNELS = ("partitioned", "bidirectional")  # their whole-tile loops read B x C


def problems(results: list[Result]) -> list[str]:
    """What fails the check: a compile error, any spill or stack frame, fewer than two resident
    blocks per SM, or a whole-tile loop of a KD kernel that issues no asynchronous copy."""
    out = []
    for r in results:
        where = f"sm_{r.arch} {r.config}"
        if not r.ok:
            out.append(f"{where}: {r.error}")
            continue
        if r.spill_store_bytes or r.spill_load_bytes or r.local_bytes or r.stack_bytes:
            out.append(
                f"{where}: spills ({r.spill_store_bytes} B stored, {r.spill_load_bytes} B "
                f"loaded, {r.local_bytes} B local, {r.stack_bytes} B stack)"
            )
        if r.blocks_per_sm < MIN_BLOCKS_PER_SM:
            out.append(
                f"{where}: {r.blocks_per_sm} block(s) per SM ({r.registers} registers x "
                f"{r.num_warps} warps, {r.shared_bytes} B shared)"
            )
        if r.config.kernel in PIPELINED_KERNELS and r.pipelined_loops < r.whole_tile_loops:
            out.append(
                f"{where}: {r.whole_tile_loops} whole-tile loops, {r.pipelined_loops} issue "
                f"asynchronous copies (LDGSTS per SASS loop: {r.loop_async_copies})"
            )
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fastkd.bench.compile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--arch", default="90,80", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BxC,BxC,...")
    parser.add_argument("--kernels", default="partitioned,bidirectional,grad_scale")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of compile-sm<arch>.json")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be real JIT functions
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [
            sys.executable,
            "-m",
            "fastkd.bench.compile",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        raise SystemExit(subprocess.run(command, env=env).returncode)

    kernels = args.kernels.split(",")
    configs = [c for c in configurations(parse_shapes(args.shapes)) if c.kernel in kernels]
    archs = [int(a) for a in args.arch.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        # A fresh Triton cache: every kernel is compiled here, so ptxas -v logs exist.
        os.environ["TRITON_CACHE_DIR"] = cache
        # Every core takes (architecture, group) tasks as it frees up: no core waits for the
        # slower architecture's last kernels.
        tasks = [(arch, group) for group in compile_groups(configs) for arch in archs]
        context = multiprocessing.get_context("spawn")
        workers = max(1, min(os.cpu_count() or 1, len(tasks)))
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            done = pool.map(
                check_group,
                [arch for arch, _ in tasks],
                [[configs[i] for i in group] for _, group in tasks],
            )
            found = {
                (arch, i): result
                for (arch, group), results in zip(tasks, done, strict=True)
                for i, result in zip(group, results, strict=True)
            }
        per_arch = [[found[arch, i] for i in range(len(configs))] for arch in archs]
    import triton

    failures = []
    for arch, results in zip(archs, per_arch, strict=True):
        out = args.out / f"compile-sm{arch}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "ahead-of-time compile of the KD kernels for a GPU, no GPU needed",
            "arch": f"sm_{arch}",
            "triton": triton.__version__,
            "configurations": len(results),
            "distinct_kernels": len({r.kernel_hash for r in results if r.ok}),
            "results": [asdict(r) | {"pipelined_loops": r.pipelined_loops} for r in results],
        }
        out.write_text(json.dumps(payload, indent=1) + "\n")
        failures += problems(results)
        good = [r for r in results if r.ok]
        print(
            f"sm_{arch}: {len(results)} configurations ({len({r.kernel_hash for r in good})} "
            f"distinct kernels), {len(results) - len(good)} failed to "
            f"compile; registers {min(r.registers for r in good)}-{max(r.registers for r in good)}, "
            f"blocks/SM >= {min(r.blocks_per_sm for r in good)}, exps per element <= "
            f"{max(r.ex2_per_element for r in good)}, stack <= "
            f"{max(r.stack_bytes for r in good)} B -> {out}"
            if good
            else f"sm_{arch}: nothing compiled -> {out}"
        )
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
