"""Where the fused KD kernels' time goes on a GPU: tile width and warps swept, kernel alone vs the
whole training step, against a copy of the same bytes.

``python scripts/kernel_sweep.py [--shape 8192x128256] [--out sweep.json]`` on a CUDA machine.
Rows, each the median of ``triton.testing.do_bench``:
- ``copy``: ``torch.add`` of the student and one teacher row into a third tensor: the ideal bytes
  of the dense partitioned kernel in one pass (the bandwidth ceiling, measured);
- ``two-pass copy``: the same twice (a two-pass kernel's reads when nothing stays in L2);
- ``kernel``: ``launch_partitioned_kd`` / ``launch_bidirectional_kd`` alone, per (tile, warps, T);
- ``step``: the loss and its backward as training calls them (checks, autograd, grad scaling).
Every result is written to the JSON as it is measured, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8192x128256")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", default="2048,4096,8192,16384")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--out", type=Path, default=Path("kernel-sweep.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    args = parser.parse_args()

    import triton.testing

    from fastkd.bench import kernels as bench
    from fastkd.kernels import tiling
    from fastkd.kernels.bidirectional_kd import BidirectionalKDConfig, bidirectional_kd_loss
    from fastkd.kernels.bidirectional_kernel import launch_bidirectional_kd
    from fastkd.kernels.partitioned_kd import PartitionedKDConfig, partitioned_kd_loss
    from fastkd.kernels.partitioned_kernel import launch_partitioned_kd

    device = torch.device(args.device)
    if device.type == "cpu":  # a dry run of the code paths: one call, no timing
        triton.testing.do_bench = lambda fn, **_: (fn(), 1.0)[1]
        torch.cuda.synchronize = lambda: None
        torch.cuda.get_device_name = lambda _=0: "cpu"
    rows, classes = (int(n) for n in args.shape.split("x"))
    blocks = [int(b) for b in args.blocks.split(",")]
    warps_options = [int(w) for w in args.warps.split(",")]
    chosen_warps = tiling.num_warps_for
    results: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": [rows, classes],
        "dtype": args.dtype,
        "rows": [],
    }

    def record(**row) -> None:
        results["rows"].append(row)
        args.out.write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)

    def timed(name: str, fn, bytes_moved: int, **extra) -> None:
        try:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")
            record(name=name, ms=ms, gbps=bytes_moved / ms / 1e6, first_call_s=first_s, **extra)
        except Exception as error:  # a config that does not compile or run: keep going
            record(name=name, error=f"{type(error).__name__}: {error}"[:400], **extra)

    ns = argparse.Namespace(members=2, topk=100)
    dense_case = bench.Case("partitioned", rows, classes, "dense", args.dtype)
    inputs = bench.make_inputs(dense_case, ns, device)
    student, labels, targets = inputs["student"], inputs["labels"], inputs["targets"]
    ideal = bench.ideal_bytes(dense_case, inputs)
    other = torch.randn_like(student)
    out = torch.empty_like(student)
    timed("copy", lambda: torch.add(student, other, out=out), ideal)
    timed(
        "two-pass copy",
        lambda: (torch.add(student, other, out=out), torch.add(student, other, out=out)),
        ideal,
    )
    grad = torch.empty_like(student)
    for temperature in (2.0, 1.0):
        for block in blocks:
            for warps in warps_options:
                if temperature == 1.0 and (block, warps) != (4096, chosen_warps(4096)):
                    continue
                tiling.num_warps_for = lambda _block, w=warps: w
                config = PartitionedKDConfig(
                    mode="live", temperature=temperature, self_index=0, max_block=block
                )
                timed(
                    "kernel partitioned dense",
                    lambda c=config: launch_partitioned_kd(student, grad, labels, targets, c),
                    ideal,
                    block=block,
                    warps=warps,
                    temperature=temperature,
                )
    tiling.num_warps_for = chosen_warps
    leaf = student.detach().requires_grad_()

    def step(**options):
        leaf.grad = None
        partitioned_kd_loss(
            leaf, labels, targets, mode="live", temperature=2.0, self_index=0, **options
        )[0].backward()

    timed("step partitioned dense", step, ideal, block="default", warps="default", temperature=2.0)
    timed(
        "step partitioned dense grad_output_is_one",
        lambda: step(grad_output_is_one=True),
        ideal,
        temperature=2.0,
    )

    bi_case = bench.Case("bidirectional", rows, classes, "live", args.dtype)
    inputs = bench.make_inputs(bi_case, ns, device)
    logits = inputs["logits"]
    grads = [torch.empty_like(z) for z in logits]
    ideal_bi = bench.ideal_bytes(bi_case, inputs)
    for block in blocks:
        for warps in warps_options:
            tiling.num_warps_for = lambda _block, w=warps: w
            config = BidirectionalKDConfig(temperature=2.0, max_block=block)
            timed(
                "kernel bidirectional",
                lambda c=config: launch_bidirectional_kd(logits, grads, labels, c),
                ideal_bi,
                block=block,
                warps=warps,
                temperature=2.0,
            )
    tiling.num_warps_for = chosen_warps
    leaves = [z.detach().requires_grad_() for z in logits]

    def bi_step():
        for z in leaves:
            z.grad = None
        bidirectional_kd_loss(leaves, labels, temperature=2.0)[0].backward()

    timed(
        "step bidirectional", bi_step, ideal_bi, block="default", warps="default", temperature=2.0
    )
    topk_case = bench.Case("partitioned", rows, classes, "topk", args.dtype)
    inputs = bench.make_inputs(topk_case, ns, device)
    topk_targets = inputs["targets"]
    ideal_topk = bench.ideal_bytes(topk_case, inputs)
    for block in (1024, 2048, 4096):
        for warps in warps_options:
            tiling.num_warps_for = lambda _block, w=warps: w
            config = PartitionedKDConfig(
                mode="live", temperature=2.0, self_index=0, max_block=block
            )
            timed(
                "kernel partitioned topk",
                lambda c=config: launch_partitioned_kd(student, grad, labels, topk_targets, c),
                ideal_topk,
                block=block,
                warps=warps,
                temperature=2.0,
            )
    tiling.num_warps_for = chosen_warps

    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
