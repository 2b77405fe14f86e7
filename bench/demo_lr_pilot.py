"""The demo's Roth-recipe learning rate, chosen on validation images only (never the test ones).

Roth et al.'s ``kl-dp`` recipe (SGD, momentum 0.9, lr 1e-4 per 256 images) fine-tunes ImageNet
models; the demo's members are small models trained from scratch, for which that lr barely
moves the weights. So the demo's two Roth arms (``kl``, ``kl_dp_roth``) take the base lr (per 256
images) that gives the best mean val top-1 over both arms and every member on fold 0, from a
grid declared here; the test images of every fold stay unseen. ``python -m
fastkd.bench.demo_lr_pilot`` writes bench/results/demo-roth-lr-pilot.json; the chosen value is
``fastkd.demo.config.ROTH_BASE_LR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from rich.console import Console

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # base lr per 256 images


def main(argv: list[str] | None = None) -> None:
    from fastkd.demo.config import ARMS_BY_NAME, DemoConfig, DemoLayout
    from fastkd.demo.run import _dump, _transfer_config, pretrain_pool
    from fastkd.files import write_json
    from fastkd.runtime import reproducible
    from fastkd.runtime.progress import machine_name
    from fastkd.training import train_all

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("runs/demo-lr-pilot"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/demo-roth-lr-pilot.json"))
    args = parser.parse_args(argv)
    console = Console()
    cfg = DemoConfig(out_dir=args.out_dir, fold_ids=(0,), progress=False)
    layout = DemoLayout.of(cfg, 0)
    start = time.perf_counter()
    rows = []
    with reproducible(cfg.device):
        _, specs = pretrain_pool(cfg, console, 0)
        _dump(cfg, layout, specs)
        for base in GRID:
            for name in ("kl", "kl_dp_roth"):
                arm = dataclasses.replace(ARMS_BY_NAME[name], lr_per_256=base)
                train_cfg = dataclasses.replace(
                    _transfer_config(cfg, layout, specs, arm, 0),
                    out_dir=args.out_dir / "pilot" / f"{base:g}" / name,
                )
                pool = train_all(train_cfg)
                for member, run in pool.runs.items():
                    val = max(record.val_top1[member] for record in run.history)
                    rows.append({"base_lr": base, "arm": name, "member": member, "val_top1": val})
                    console.print(f"base lr {base:g}, {name}, {member}: val top-1 {val:.2f}%")
    means = {
        base: sum(r["val_top1"] for r in rows if r["base_lr"] == base)
        / sum(1 for r in rows if r["base_lr"] == base)
        for base in GRID
    }
    chosen = max(GRID, key=lambda base: means[base])
    write_json(
        args.json,
        {
            "what": "mean val top-1 (%) of the demo's Roth arms (kl, kl_dp_roth) on fold 0, per "
            "base lr (per 256 images); the test images are not read",
            "grid": list(GRID),
            "mean_val_top1": {f"{base:g}": means[base] for base in GRID},
            "chosen": chosen,
            "rows": rows,
            "seconds": round(time.perf_counter() - start, 1),
            "machine": machine_name(cfg.device if cfg.device != "auto" else None),
        },
    )
    console.print(f"chosen base lr: {chosen:g} -> {args.json}")


if __name__ == "__main__":
    main()
