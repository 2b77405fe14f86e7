"""Faithfulness of compressed soft targets: each tail model against the dense teacher.

The reference of a row is the dense KL(softmax(t / T) || softmax(z / T)) of the teacher's fp64
logits t and the student's fp64 logits z, and its gradient in z (autograd). Each compressed
target is made as a store keeps it (``PoolTargets.from_logits``: fp16 log-probabilities, the
tail's two fp32 masses, the sampled tail's draws) and read by ``PoolTargets.divergence``, the
reference the kernel re-implements. Per row: the KL's relative error, the gradient's relative L2
error and its cosine with the dense gradient (gradients of the KL itself: the loss's T^2 cancels
in both). The stored dense target (fp16 log-probabilities) is measured too: the floor any
sparse target sits on.

* synthetic: 1000-class rows from two generators (``GENERATORS``: a ranked one whose entropy
  spans confident to uncertain, and a pessimistic Gaussian one), every tail model at equal raw
  bytes per stored view (``raw_bytes_per_view``; at most the budget): uniform and bucket keep the
  same top-k, the sampled tail trades top-k classes for draws (every split that fills it). The sampled
  tail is random: one draw per row is the main figure, the mean of ``--draws`` draws (as the
  stored views and epochs average it) a second one.
* populations: every tail model at top-k 5 and 10 (the sampled one with the dump's default draws)
  on four row populations: confident, high-entropy and label-smoothed 1000-class rows
  (``POPULATIONS``) and the demo pool's real outputs (10 classes); and the default tail model
  that docs/method.md's criterion picks from them (``default_choice``).
* pool: the logits of the demo's trained pool (``fastkd.demo``; 10 classes) on the digits' eval
  view, every ordered (teacher, student) pair, top-k 1..5.
* transfer: the demo run end to end with dense targets and with top-3 sparse targets under each
  tail model; each sparse run's test top-1 against the dense run's, paired by (arm, seed,
  member).

Run: ``python -m fastkd.bench.targets`` (``--quick``: fewer rows, the quick pool, no transfer);
results go to ``bench/results/targets-cpu.json`` (fp64 on the CPU, whatever the host has).

Each part has its module (``targets_synthetic``, ``targets_populations``, ``targets_pool``,
``targets_transfer``) and
shares the measure of ``target_errors``; this one parses the arguments, runs the parts and
writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fastkd.bench.target_errors import Setting
from fastkd.bench.targets_pool import pool_part
from fastkd.bench.targets_populations import populations_part
from fastkd.bench.targets_synthetic import budget_settings, synthetic_part
from fastkd.bench.targets_transfer import transfer_part
from fastkd.dump import DEFAULT_TAIL_SAMPLES
from fastkd.runtime import machine_name

__all__ = ["budget_settings", "main", "parse_args"]  # budget_settings: its tests call it here

RESULTS = Path(__file__).resolve().parent / "results" / "targets-cpu.json"
PARTS = ("synthetic", "populations", "pool", "transfer")

# -- entry point --------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fastkd.bench.targets", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=",".join(PARTS))
    parser.add_argument("--quick", action="store_true", help="fewer rows, quick pool, no transfer")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (2048; quick 256)")
    parser.add_argument("--classes", type=int, default=1000, help="synthetic classes")
    parser.add_argument("--budgets", type=_ints, default=[24, 48], help="raw bytes per view")
    parser.add_argument("--temperatures", type=_floats, default=[1.0, 2.0, 4.0])
    parser.add_argument("--draws", type=int, default=8, help="sampled-tail draws averaged")
    parser.add_argument(
        "--population-rows", type=int, default=None, help="rows per population (2000; quick 256)"
    )
    parser.add_argument("--population-topk", type=_ints, default=[5, 10])
    parser.add_argument("--population-tail-samples", type=int, default=DEFAULT_TAIL_SAMPLES)
    parser.add_argument("--pool-topk", type=_ints, default=[1, 2, 3, 4, 5])
    parser.add_argument("--pool-tail-samples", type=_ints, default=[2, 4])
    parser.add_argument("--pool-splits", default="train,val", help="digits splits")
    parser.add_argument(
        "--pairs-splits", default="train", help="splits whose per-pair rows are written"
    )
    parser.add_argument("--transfer-seeds", type=_ints, default=[0])
    parser.add_argument("--transfer-tail-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/bench-targets"), help="demo pool, stores, runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.parts = [p for p in args.parts if p != "transfer"]
    if args.rows is None:
        args.rows = 256 if args.quick else 2048
    if args.population_rows is None:
        args.population_rows = 256 if args.quick else 2000
    args.pool_splits = [s for s in args.pool_splits.split(",") if s]
    args.pairs_splits = [s for s in args.pairs_splits.split(",") if s]
    if min(args.draws, args.rows, args.population_rows) < 1:
        parser.error("--draws, --rows and --population-rows must be >= 1")
    return args


def _summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline figures: median / p90 gradient error per setting at T = 1 and 2."""
    lines = []
    for r in result.get("synthetic", {}).get("results", []):
        if r["temperature"] in (1.0, 2.0):
            g = r["grad_rel_l2"]
            lines.append(
                f"{r['generator']:8s} {r['budget_bytes'] or '-':>4} B  "
                f"{Setting(r['tail'], r['topk'], r['tail_samples']).label:18s} "
                f"T={r['temperature']:g}  grad err median {g['median']:.3g} p90 {g['p90']:.3g}"
            )
    populations = result.get("populations", {})
    for r in populations.get("results", []):
        if r["temperature"] in (1.0, 2.0) and r["tail"] != "dense":
            g, setting = r["grad_rel_l2"], Setting(r["tail"], r["topk"], r["tail_samples"])
            lines.append(
                f"{r['population']:14s} {setting.label:18s} "
                f"T={r['temperature']:g}  grad err median {g['median']:.3g} p90 {g['p90']:.3g}"
            )
    if populations:
        lines.append(f"default tail by the criterion: {populations['default_choice']['chosen']}")
    for r in result.get("pool", {}).get("all_pairs", []):
        if r["temperature"] in (1.0, 2.0) and r["topk"] in (0, 3):
            g = r["grad_rel_l2"]
            lines.append(
                f"pool {r['split']:5s} {r['bytes']:>3} B  "
                f"{Setting(r['tail'], r['topk'], r['tail_samples']).label:18s} "
                f"T={r['temperature']:g}  grad err median {g['median']:.3g} p90 {g['p90']:.3g}"
            )
    for label, run in result.get("transfer", {}).get("runs", {}).items():
        change = run.get("top1_change_vs_dense", {}).get("kd_arms")
        if change:
            lines.append(f"transfer {label}: KD arms' top-1 vs dense {change['mean']:+.2f} points")
    return lines


TABLES = ("results", "all_pairs", "pairs")  # lists of result rows: one row a line in the JSON


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def format_json(value: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with anything that fits in ``width`` characters on one line, and the rows of the
    result tables one a line (readable, and a diff shows which rows changed)."""
    flat = json.dumps(value, allow_nan=False)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k)}: "
            + (
                "[\n"
                + ",\n".join(f"{pad}  {json.dumps(row, allow_nan=False)}" for row in v)
                + f"\n{pad}]"
                if k in TABLES and isinstance(v, list) and v
                else format_json(v, indent + 2, width)
            )
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{format_json(v, indent + 2, width)}" for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    result: dict[str, Any] = {
        "benchmark": "compressed soft targets vs the dense teacher: KL and gradient errors",
        "machine": machine_name("cpu"),  # fp64 reference math on the CPU
        "platform": platform.platform(),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "statistics": (
            "per row: kl_rel_error |kl - kl_dense| / kl_dense, grad_rel_l2 ||g - g_dense|| / "
            "||g_dense||, grad_cosine; median and p90 (cosine: p10, its bad end) over rows; "
            "*_total: the same summed over all rows; bytes: raw bytes per stored view"
        ),
    }
    seconds = {}
    for part, run in (
        ("synthetic", lambda: synthetic_part(args)),
        ("populations", lambda: populations_part(args, console)),
        ("pool", lambda: pool_part(args, console)),
        ("transfer", lambda: transfer_part(args, console)),
    ):
        if part in args.parts:
            console.rule(f"[bold]{part}")
            start = time.perf_counter()
            result[part] = run()
            seconds[part] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_json(finite(result)) + "\n")
    for line in _summary_lines(result):
        console.print(line, highlight=False)
    console.print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
