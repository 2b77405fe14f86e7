"""The training call alone on the device, against a copy of its ideal bytes (``--alone``).

``fastkd bench kernels --alone``: for each shape, teacher (dense, top-k) and temperature, the
partitioned loss as ``fastkd train`` calls it (``kernel_methods.training_call``: forward +
backward, rows summed, ``grad_output_is_one``) is captured ``--graph-calls`` times in one CUDA
graph and replayed, timed with CUDA events: the device's time per call with no host work between
launches. A copy of the case's ideal bytes (``kernel_cases.ideal_bytes``), captured and replayed
alike, is the bandwidth it is held against: ``torch.add`` of the student and a row-sized operand
into a third tensor for a dense teacher (read 2C, read 2C, write 2C per row in 16-bit dtypes:
the ideal 6C), a copy of the student into the gradient for top-k (read and write; the top-k's
K ids and values per row are counted in the kernel's ideal bytes, too few to time). A method's
``pct_copy`` is its GB/s (ideal bytes over its time) as a percentage of the copy's GB/s.
torch.compile of the torch reference and Liger's KL path (dense teachers) are timed the same way
beside it. ``host_us`` is the Python call's wall time with the device idle (``bench.host``).

Where a graph cannot be captured (on CPU; a method whose capture fails), the step is timed as
it is called and ``timing`` says so: on CPU this is a cheap run of the same code path (the tests
run it at tiny shapes), not a measurement of a kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from fastkd.bench.host import host_us
from fastkd.bench.kernel_cases import Case, Measurement, ideal_bytes, make_inputs, timed
from fastkd.bench.kernel_methods import training_methods

ALONE_SHAPES = "8192x1000,4096x32000,8192x128256"
ALONE_TOPK = 10


def alone_cases(args: argparse.Namespace, shapes: list[tuple[int, int]]) -> list[Case]:
    """Every (shape, teacher, T) of the run: the partitioned kernel, as training runs it."""
    return [
        Case("partitioned", rows, classes, teacher, args.dtype, float(temperature))
        for rows, classes in shapes
        for teacher in args.teachers.split(",")
        for temperature in args.temperatures.split(",")
    ]


def copy_step(case: Case, inputs: dict) -> tuple[Callable[[], None], int]:
    """A copy of the case's ideal bytes (module docstring) and the bytes it moves."""
    student = inputs["student"].detach()
    out = torch.empty_like(student)
    nbytes = student.numel() * student.element_size()
    if inputs["targets"].is_sparse:
        return lambda: out.copy_(student), 2 * nbytes
    other = torch.empty_like(student)
    return lambda: torch.add(student, other, out=out), 3 * nbytes


def replay_ms(
    step: Callable[[], None], device: torch.device, calls: int, reps: int
) -> tuple[float, str]:
    """Milliseconds per call of ``step`` and how they were timed: ``calls`` calls captured in
    one CUDA graph, the median of ``reps`` replays; else (CPU, a capture that fails) the median
    of ``reps`` rounds of ``calls`` calls as made, host work included."""
    if device.type == "cuda":
        try:
            return _graph_ms(step, calls, reps), f"cuda_graph ({calls} calls per replay)"
        except Exception as error:  # a method that cannot be captured: its timing as called
            torch.cuda.synchronize()
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            import triton.testing

            ms = triton.testing.do_bench(step, warmup=10, rep=100, return_mode="median")
            return ms, f"as called, device synchronised (no CUDA graph: {reason})"
    step()  # first-call work outside the timed rounds
    rounds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        rounds.append((time.perf_counter() - start) / calls)
    return 1e3 * statistics.median(rounds), f"as called on {device.type} (no CUDA graph)"


def _graph_ms(step: Callable[[], None], calls: int, reps: int) -> float:
    side = torch.cuda.Stream()  # warm-up off the default stream, as graph capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile, autotune, allocate
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # each call frees its gradient: the graph's pool reuses it
        for _ in range(calls):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


def run_alone_case(case: Case, args: argparse.Namespace, device: torch.device, peak: float | None):
    """One case: the copy, then each method; GB/s and % of the copy, host us of the call."""
    inputs = make_inputs(case, args, device)
    # As training reads them: dense targets at T != 1 carry the teacher's log-sum-exp at T.
    inputs["targets"] = inputs["targets"].with_lse(case.temperature)
    nbytes = ideal_bytes(case, inputs)
    copy, copy_bytes = copy_step(case, inputs)
    copy_ms, copy_timing = replay_ms(copy, device, args.graph_calls, args.reps)
    copy_gbps = copy_bytes / copy_ms / 1e6
    results = [
        Measurement(
            "copy",
            time_ms=copy_ms,
            gbps=copy_gbps,
            pct_peak=None if peak is None else 100 * copy_gbps * 1e9 / peak,
            pct_copy=100.0,
            timing=copy_timing,
            note=f"{copy_bytes} bytes copied",
        )
    ]
    found = training_methods(case, inputs, case.temperature, not args.no_compile)
    for name, step in found.items():
        if isinstance(step, str):
            results.append(Measurement(name, note=step))
            continue
        outcome = timed(
            name, lambda step=step: replay_ms(step, device, args.graph_calls, args.reps)
        )
        if isinstance(outcome, Measurement):
            results.append(outcome)
            continue
        ms, timing = outcome
        gbps = nbytes / ms / 1e6
        measured = Measurement(
            name,
            time_ms=ms,
            gbps=gbps,
            pct_peak=None if peak is None else 100 * gbps * 1e9 / peak,
            pct_copy=100 * gbps / copy_gbps,
            timing=timing,
        )
        if name == "fastkd":
            measured.host_us = host_us(step, device, args.host_calls)["median_us"]
        results.append(measured)
    fastkd = results[1].time_ms
    for m in results[2:]:
        if m.time_ms is not None and fastkd is not None:
            m.fastkd_speedup = m.time_ms / fastkd
    del inputs, found
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "case": asdict(case),
        "ideal_bytes": nbytes,
        "copy_bytes": copy_bytes,
        "results": [asdict(m) for m in results],
    }
