"""Compile check of the KD kernels for GPUs, without a GPU: registers, spills, loads, exps.

``fastkd bench compile [--arch 90,80] [--shapes ...] [--out DIR]``. For every configuration the
launchers pick at the benchmark shapes (dense teachers in fp16 / bf16 / fp32, top-k 10 and 100
with int32 / int64 ids, partition modes live / fixed / best; at the benchmark shape
4096 x 32000 also plain KD (the teachers' mixture: one fp32 column read as best) and live with
the label-free confidence score; bidirectional N = 2, 3, 4 with stop_grad on and off; the
backward's grad_output scale pass on bf16 / fp16 / fp32 gradients, per row at 4096 x 32000, its
masked remainder at 33 x 21841), it
records the launch the launcher makes on CPU tensors of that shape
(``kernels.launch.capture_launches``), compiles it with ``triton.compile`` for the target through
a stand-in active driver, runs the wheel's ptxas -v (registers, spills, shared memory) and reads
the SASS with its cuobjdump (global load and store widths, MUFU.EX2 per element). One JSON per
architecture, ``bench/results/compile-sm<arch>.json``. Triton must not be in interpreter mode
(the command clears TRITON_INTERPRET for itself).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = "256x1000,1024x21841,4096x32000,8192x128256"
BENCHMARK_SHAPE = (4096, 32000)  # the case (docs/design.md's roofline)
# Per-SM limits of the architectures checked: registers, threads, resident blocks, shared memory.
SM_LIMITS = {
    90: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 * 1024},
    80: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 * 1024},
}


@dataclass(frozen=True)
class Config:
    """One kernel configuration at one shape."""

    kernel: str  # partitioned | bidirectional | grad_scale
    rows: int
    classes: int
    teacher: str = ""  # partitioned: dense-<dtype> or top<K>-<tail>-<id dtype>
    mode: str = ""  # partitioned: live | fixed | best | plain; grad_scale: "tail" (remainder)
    score: str = "label"  # partitioned: the partition score, label | confidence
    models: int = 0  # bidirectional: N
    stop_grad: bool = True
    temperature: float = 1.0
    dtype: str = "bfloat16"  # the student's (every model's) logits; grad_scale: the gradient's
    per_row: bool = False  # grad_scale: one factor a row (reduction "none"), else a scalar


@dataclass
class Result:
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
    compile_seconds: float = 0.0


def configurations(shapes: list[tuple[int, int]]) -> list[Config]:
    """Every configuration the issue asks the check to cover, at every shape."""
    teachers = [f"dense-{d}" for d in ("float16", "bfloat16", "float32")]
    teachers += [f"top{k}-bucket-{i}" for k in (10, 100) for i in ("int32", "int64")]
    teachers += [f"top10-{tail}-int64" for tail in ("uniform", "sampled")]
    configs = [
        Config("partitioned", rows, classes, teacher=teacher, mode=mode)
        for (rows, classes), teacher, mode in itertools.product(
            shapes, teachers, ("live", "fixed", "best")
        )
    ]
    if BENCHMARK_SHAPE in shapes:  # plain KD's launch, and the label-free partition score
        rows, classes = BENCHMARK_SHAPE
        configs += [
            Config("partitioned", rows, classes, teacher="dense-float32", mode="plain"),
            Config("partitioned", rows, classes, "dense-bfloat16", "live", score="confidence"),
        ]
    configs += [
        Config("partitioned", rows, classes, teacher=teacher, mode="live", temperature=t)
        for (rows, classes), teacher, t in itertools.product(
            shapes, ("dense-bfloat16", "top10-bucket-int64"), (2.0, 4.0)
        )
    ]
    configs += [
        Config("bidirectional", rows, classes, models=n, stop_grad=stop)
        for (rows, classes), n, stop in itertools.product(shapes, (2, 3, 4), (True, False))
    ]
    configs += [  # the backward's scale pass (kernels.grad_scale)
        Config("grad_scale", rows, classes, dtype=dtype)
        for (rows, classes), dtype in itertools.product(shapes, ("bfloat16", "float16", "float32"))
    ]
    if BENCHMARK_SHAPE in shapes:
        configs.append(Config("grad_scale", *BENCHMARK_SHAPE, per_row=True))
    # the flat kernel's masked remainder (B x C not a whole number of blocks)
    configs.append(Config("grad_scale", 33, 21841, mode="tail"))
    return configs


# ----------------------------------------------------------------------------------------------
# Capturing the launch a launcher makes


def _empty(shape: tuple[int, ...], dtype: Any) -> Any:
    """Uninitialised CPU memory: the pages of a multi-GiB tensor are never touched."""
    import torch

    return torch.empty(shape, dtype=dtype)


def capture(config: Config) -> Any:
    """The one launch the config's launcher makes (kernels.launch.Launch)."""
    import torch

    from fastkd.kernels import PoolTargets, bidirectional_kd, grad_scale, partitioned_kd
    from fastkd.kernels.launch import capture_launches

    dtype = getattr(torch, config.dtype)
    rows, classes = config.rows, config.classes
    labels = torch.zeros(rows, dtype=torch.int64)
    with capture_launches() as launches:
        if config.kernel == "grad_scale":
            factor = torch.ones(rows) if config.per_row else torch.tensor(1.0)
            grad_scale.scale_rows_(_empty((rows, classes), dtype), factor)
            launches[:] = launches[-1:] if config.mode == "tail" else launches[:1]
        elif config.kernel == "bidirectional":
            logits = [_empty((rows, classes), dtype) for _ in range(config.models)]
            grads = [_empty((rows, classes), dtype) for _ in range(config.models)]
            cfg = bidirectional_kd.BidirectionalKDConfig(
                stop_grad=config.stop_grad, temperature=config.temperature, reduction="sum"
            )
            bidirectional_kd.launch_bidirectional_kd(logits, grads, labels, cfg)
        else:
            # plain: the launch after PoolTargets.mixture, one fp32 column read as best
            members = 1 if config.mode == "plain" else 2
            kind, *tail, teacher_dtype = config.teacher.split("-")
            true_logprob = torch.zeros(rows, members)
            if kind == "dense":
                targets = PoolTargets(
                    true_logprob,
                    logprobs=_empty((rows, members, classes), getattr(torch, teacher_dtype)),
                )
            else:
                k, ids = int(kind.removeprefix("top")), getattr(torch, teacher_dtype)
                targets = PoolTargets(
                    true_logprob,
                    topk_logprobs=_empty((rows, members, k), torch.float16),
                    topk_ids=torch.zeros(rows, members, k, dtype=ids),
                    log_tail=torch.zeros(rows, members),
                    log_tail_sqrt=torch.zeros(rows, members),
                    tail_ids=torch.zeros(rows, members, 8, dtype=ids)
                    if tail == ["sampled"]
                    else None,
                    tail=tail[0],
                )
            cfg = partitioned_kd.PartitionedKDConfig(
                mode="best" if config.mode == "plain" else config.mode,
                self_index=1 if config.mode == "fixed" else None,
                partition_score=config.score,
                temperature=config.temperature,
                reduction="sum",
            )
            student = _empty((rows, classes), dtype)
            partitioned_kd.launch_partitioned_kd(
                student, torch.empty_like(student), labels, targets, cfg, scores=true_logprob
            )
    (launch,) = launches
    return launch


# ----------------------------------------------------------------------------------------------
# Compiling and reading the machine code


_PTXAS_LOGS: dict[str, str] = {}  # compiled kernel hash -> the ptxas -v log of its compile


class _StandInDriver:
    """The active driver while compiling: it names the target and launches nothing."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

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
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v and prints its log
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


def sass_counts(cubin: bytes) -> tuple[dict[str, int], dict[str, int], int]:
    """Global loads and stores by opcode (width) and the MUFU.EX2 count in the SASS."""
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(binary)], capture_output=True, text=True, check=True
        ).stdout
    loads = collections.Counter(re.findall(r"\b(LDG\.E[.\w]*)", sass))
    stores = collections.Counter(re.findall(r"\b(STG\.E[.\w]*)", sass))
    return (
        dict(sorted(loads.items())),
        dict(sorted(stores.items())),
        len(re.findall(r"MUFU\.EX2", sass)),
    )


def loop_exps(ttgir: str) -> int:
    """Exponentials per row element: the tensor-valued exp / exp2 ops inside the ``scf.for``
    loops over whole tiles (each loop visits every element of a row's body once; the masked
    head and tail outside them are a few elements a row). Each lowers to one MUFU.EX2."""
    count, depth, loop_depths = 0, 0, []
    for line in ttgir.splitlines():
        loop = re.search(r"scf\.for %\S+ = %\S+ to (%\S+) step", line)
        if loop and line.rstrip().endswith("{"):
            # whole-tile loops run to a row's tile count; a loop to a literal (the masked ends,
            # two trips) is not one
            whole_tiles = not re.fullmatch(r"%c\d+_i\d+(_\d+)?", loop.group(1))
            loop_depths.append((depth, whole_tiles))
        if any(w for _, w in loop_depths) and re.search(r"= math\.exp2? %\S+ : tensor<", line):
            count += 1
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1][0]:
            loop_depths.pop()
    return count


def blocks_per_sm(arch: int, registers: int, warps: int, shared: int) -> int:
    """Resident blocks per SM: registers (per-warp allocation in 256-register units), threads,
    the block limit and shared memory, whichever binds first."""
    limits = SM_LIMITS[arch]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * warps)
    by_threads = limits["threads"] // (32 * warps)
    by_shared = limits["shared"] // (shared + 1024) if shared else limits["blocks"]
    return min(by_registers, by_threads, limits["blocks"], by_shared)


def check(config: Config, arch: int) -> Result:
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
    result.constexprs = {
        k: v for k, v in launch.options.items() if isinstance(v, int | bool | float | str)
    }
    result.num_warps = compiled.metadata.num_warps
    for key, value in resource_usage(compiled.asm["cubin"], ptxas_log).items():
        setattr(result, key, value)
    result.shared_bytes = max(result.shared_bytes, compiled.metadata.shared)
    result.loads, result.stores, result.mufu_ex2 = sass_counts(compiled.asm["cubin"])
    # per element of each model's row (the partitioned kernel: of the student's, with its
    # teacher's matching element)
    result.ex2_per_element = loop_exps(compiled.asm["ttgir"]) / max(1, config.models)
    result.blocks_per_sm = blocks_per_sm(
        arch, result.registers, result.num_warps, result.shared_bytes
    )
    return result


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]


def check_arch(arch: int, configs: list[Config]) -> list[Result]:
    """Every config compiled for one architecture (one process: its kernel cache is shared)."""
    return [check(config, arch) for config in configs]


def problems(results: list[Result]) -> list[str]:
    """What fails the check: a compile error or any spill."""
    out = []
    for r in results:
        where = f"sm_{r.arch} {r.config}"
        if not r.ok:
            out.append(f"{where}: {r.error}")
        elif r.spill_store_bytes or r.spill_load_bytes or r.local_bytes:
            out.append(
                f"{where}: spills ({r.spill_store_bytes} B stored, {r.spill_load_bytes} B "
                f"loaded, {r.local_bytes} B local, {r.stack_bytes} B stack)"
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
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(archs), mp_context=context) as pool:
            per_arch = list(pool.map(check_arch, archs, [configs] * len(archs)))
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
            "results": [asdict(r) for r in results],
        }
        out.write_text(json.dumps(payload, indent=1) + "\n")
        failures += problems(results)
        good = [r for r in results if r.ok]
        print(
            f"sm_{arch}: {len(results)} configurations, {len(results) - len(good)} failed to "
            f"compile; registers {min(r.registers for r in good)}-{max(r.registers for r in good)}, "
            f"blocks/SM >= {min(r.blocks_per_sm for r in good)}, exps per element <= "
            f"{max(r.ex2_per_element for r in good)} -> {out}"
            if good
            else f"sm_{arch}: nothing compiled -> {out}"
        )
    for line in failures:
        print(f"FAIL {line}", file=sys.stderr)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
