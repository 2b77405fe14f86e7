"""Host time of the loss's training call: microseconds of Python per call with the device idle.

``fastkd bench host [--shapes 256x1000,8192x128256] [--device cpu|cuda] [--out PATH]``. The call
is ``fastkd train``'s (``kernel_methods.training_call``: forward + backward, rows summed,
``grad_output_is_one``) on the partitioned kernel, dense and top-k teachers, at each T. On CPU
the Triton launches are recorded, not run (``kernels.launch.capture_launches``), so no device
work is timed: what is left is the host's (checks, small tensor operations, autograd); on a GPU
each call starts on an idle device (synchronised before it), so its wall time is the host's
while the launches queue. Host time hardly depends on C (nothing in it reads a row), so the
inputs are made without values: a large case costs no memory it does not touch. Each case also
counts what one call dispatches: the operations that would launch a GPU kernel
(``kernels.launch.CountOperations``) and the Triton launches. Results: ``bench/results/host-cpu.json`` on CPU, ``host-<device>.json`` on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastkd.bench.device_defaults import synchronize
from fastkd.errors import ConfigError
from fastkd.runtime import machine_name, resolve_device

RESULTS = Path(__file__).resolve().parent / "results"
HOST_SHAPES = "256x1000,8192x128256"
SMALL_CLASSES = 1000  # the targets are compressed at this width, then widened without values


def host_us(step: Callable[[], None], device: torch.device, calls: int) -> dict[str, float]:
    """Median and fastest microseconds of the host per call of ``step``: on CPU with the Triton
    launches recorded instead of run and one thread (on a shared machine, waking torch's
    intra-op pool for the small tensors' operations costs scheduler ticks that a GPU's launches
    of the same operations do not), on a GPU each call started on an idle device."""
    from fastkd.kernels.launch import capture_launches

    times = []
    threads = torch.get_num_threads()
    if device.type == "cpu":  # no intra-op pool: its hand-offs are CPU tensors' cost, not a GPU's
        torch.set_num_threads(1)
    try:
        for _ in range(calls + 2):  # two warm-up calls (first-call caches, allocator)
            synchronize(device)
            with capture_launches() if device.type == "cpu" else contextlib.nullcontext():
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        synchronize(device)
    finally:
        torch.set_num_threads(threads)
    times = times[2:]
    return {"median_us": 1e6 * statistics.median(times), "min_us": 1e6 * min(times)}


def dispatched(step: Callable[[], None]) -> dict[str, object]:
    """What one call dispatches: the operations that would launch a GPU kernel
    (``kernels.launch.CountOperations``, the three-operation test's counter), by name, and its
    Triton launches."""
    from fastkd.kernels.launch import CountOperations, capture_launches

    with capture_launches() as launches, CountOperations() as counter:
        step()
    return {
        "operations": counter.total,
        "operation_names": dict(sorted(counter.operations.items())),
        "triton_launches": [
            getattr(launch.kernel, "__name__", str(launch.kernel)) for launch in launches
        ],
    }


def make_host_inputs(case, args: argparse.Namespace, device: torch.device) -> dict:
    """Inputs of the shapes and dtypes training passes, without values where the call never
    reads them on the host: targets compressed at ``SMALL_CLASSES`` wide (top-k ids are then in
    range at any C), a dense teacher's rows and the student's logits left uninitialised; at
    T != 1 a dense teacher's log-sum-exp at T, as training reads it (``PoolTargets.with_lse``)."""
    from fastkd.compression import TailModel
    from fastkd.kernels import PoolTargets

    gen = torch.Generator(device=device).manual_seed(0)
    rows, classes = case.rows, case.classes
    small = min(classes, SMALL_CLASSES)
    labels = torch.randint(0, small, (rows,), device=device, generator=gen)
    pool = torch.randn(rows, args.members, small, device=device, generator=gen)
    if case.teacher == "topk":
        targets = PoolTargets.from_logits(pool, labels, args.topk, TailModel.BUCKET)
        # as training's store reader hands them over (fastkd.targets.pool_targets)
        targets.log_tail_sqrt = targets.log_tail_sqrt.float()
    else:
        targets = PoolTargets.from_logits(pool, labels, 0).with_lse(case.temperature)
        wide = torch.empty(rows, args.members, classes, device=device, dtype=targets.logprobs.dtype)
        targets = dataclasses.replace(targets, logprobs=wide)
    dtype = getattr(torch, case.dtype)
    student = torch.empty(rows, classes, device=device, dtype=dtype)
    return {"student": student, "labels": labels, "targets": targets}


def _interpreted_kernels() -> None:
    """On CPU the kernels' Triton path runs (its launches recorded) only if ``triton.jit`` saw
    TRITON_INTERPRET=1 when ``fastkd.kernels`` was imported: set it before that import."""
    if os.environ.get("TRITON_INTERPRET", "1") == "1" and (
        "fastkd.kernels" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        os.environ["TRITON_INTERPRET"] = "1"
        return
    raise ConfigError(
        "fastkd bench host on CPU times the kernels' Triton path with its launches recorded, "
        "which needs TRITON_INTERPRET=1 before fastkd.kernels is imported: unset TRITON_INTERPRET "
        "or set it to 1 (or pass --device cuda on a GPU)"
    )


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fastkd.bench.host", description=__doc__
    )
    parser.add_argument("--shapes", default=HOST_SHAPES, help="B x C list")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--teachers", default="dense,topk")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--members", type=int, default=2, help="pool members (the student is 0)")
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case")
    parser.add_argument("--device", default="cpu", help="cpu (launches recorded) or cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    device = resolve_device(args.device)
    if device.type == "cpu":
        _interpreted_kernels()
    # Imported here: on CPU fastkd.kernels must see TRITON_INTERPRET=1 (``_interpreted_kernels``).
    from fastkd.bench.kernel_cases import Case, parse_shapes
    from fastkd.bench.kernel_methods import training_call

    report = []
    for rows, classes in parse_shapes(args.shapes):
        for teacher in args.teachers.split(","):
            for temperature in (float(t) for t in args.temperatures.split(",")):
                case = Case("partitioned", rows, classes, teacher, args.dtype, temperature)
                step = training_call(case, make_host_inputs(case, args, device), temperature)
                timing = host_us(step, device, args.calls)
                entry = {"case": dataclasses.asdict(case), **timing, **dispatched(step)}
                report.append(entry)
                print(
                    f"{rows}x{classes} {teacher:<5} T={temperature:g}: host "
                    f"{timing['median_us']:.0f} us per call (fastest {timing['min_us']:.0f})"
                    f", {entry['operations']} operations besides {len(entry['triton_launches'])} launch(es)"
                )
                del step
    name = machine_name(device)
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or RESULTS / f"host-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    recorded = "Triton launches recorded, not run" if device.type == "cpu" else "device idle"
    summary = {"device": name, "torch": torch.__version__, "timing": recorded, "calls": args.calls}
    summary["args"] = {k: str(v) for k, v in vars(args).items()}
    out.write_text(json.dumps({**summary, "cases": report}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
