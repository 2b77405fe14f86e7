"""The demo's report: statistics over seeds and (seed, member) pairs, the verdict, and its output.

Kept apart from the stages so that a report can be built, checked and rendered from transfer
reports alone (the tests build one by hand); it reads the arms from ``fastkd.demo.config`` and
nothing from ``fastkd.demo.run``. Everything printed or saved (tables, conclusion, JSON, PNG, TXT)
is computed here from the same ``summary`` and ``comparisons``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fastkd.demo.config import ARMS_BY_NAME
from fastkd.files import write_json
from fastkd.metrics import TransferReport

REPORT_STEM = "report"  # report.json, report.png, report.txt in the output folder


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return {"mean": float(array.mean()), "std": std}


@dataclass(frozen=True)
class Comparison:
    """A transfer arm against a control on the same (seed, member) pairs: after - after.

    Both arms start from the same checkpoint, so this is also the difference of their deltas.
    ``verdict``: "better" / "worse" when mean -/+ 2 standard errors excludes 0, else "no clear
    difference".
    """

    arm: str
    control: str
    mean: float
    std: float
    sem: float
    pairs: int
    verdict: str

    @classmethod
    def of(cls, arm: str, control: str, differences: Sequence[float]) -> Comparison:
        stat = _mean_std(differences)
        mean, std = stat["mean"], stat["std"]
        sem = std / math.sqrt(len(differences))  # NaN for a single pair
        margin = 2.0 * sem
        if math.isnan(margin):
            verdict = "too few pairs to tell"
        elif mean - margin > 0:
            verdict = "better"
        elif mean + margin < 0:
            verdict = "worse"
        else:
            verdict = "no clear difference"
        return cls(arm, control, mean, std, sem, len(differences), verdict)


@dataclass
class DemoReport:
    """Every arm's transfer report per seed (test split), the pool, and their aggregates."""

    config: dict[str, Any]
    pool: list[dict[str, Any]]  # name, arch, checkpoint (relative to out_dir), val_top1
    test_data: str  # relative to out_dir
    store: str  # relative to out_dir
    runs: dict[str, dict[int, TransferReport]]  # arm -> seed -> report
    run_dirs: dict[str, dict[int, str]]  # arm -> seed -> train_all's folder (relative)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def arms(self) -> list[str]:
        return list(self.runs)

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for runs in self.runs.values() for seed in runs})

    @property
    def members(self) -> list[str]:
        return [member["name"] for member in self.pool]

    @property
    def num_samples(self) -> int:
        return next(iter(next(iter(self.runs.values())).values())).num_samples

    def figure(self, arm: str, seed: int, member: str, name: str) -> float:
        """One ``ModelTransfer`` field of ``member`` in the report of (``arm``, ``seed``)."""
        for model in self.runs[arm][seed].models:
            if model.name == member:
                return float(getattr(model, name))
        raise KeyError(f"no model {member!r} in the {arm!r} report of seed {seed}")

    def top1_before(self, member: str) -> float:
        """The pool member's test top-1 before transfer (the same checkpoint in every run)."""
        return self.figure(self.arms[0], self.seeds[0], member, "top1_before")

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per arm: each member's figures and the pool's mean delta, mean and std over seeds."""
        out: dict[str, dict[str, Any]] = {}
        for arm, by_seed in self.runs.items():
            members = {
                member: {
                    "top1_before": self.top1_before(member),
                    **{
                        name: _mean_std([self.figure(arm, s, member, name) for s in by_seed])
                        for name in ("top1_after", "delta", "knowledge_gain", "knowledge_loss")
                    },
                }
                for member in self.members
            }
            pool_delta = [
                float(np.mean([self.figure(arm, s, m, "delta") for m in self.members]))
                for s in by_seed
            ]
            out[arm] = {
                "members": members,
                "pool_delta": _mean_std(pool_delta),
                "success_rate": _mean_std([report.success_rate for report in by_seed.values()]),
            }
        return out

    def comparisons(self) -> list[Comparison]:
        """Every transfer arm against every control, paired by (seed, member)."""
        compared = []
        for arm in (a for a in self.arms if not ARMS_BY_NAME[a].control):
            for control in (a for a in self.arms if ARMS_BY_NAME[a].control):
                differences = [
                    self.figure(arm, s, m, "top1_after") - self.figure(control, s, m, "top1_after")
                    for s in self.seeds
                    for m in self.members
                ]
                compared.append(Comparison.of(arm, control, differences))
        return compared

    def conclusion(self) -> list[str]:
        """What the numbers say, in sentences computed from them."""
        summary = self.summary()
        lines = []
        for arm in self.arms:
            pool = summary[arm]["pool_delta"]
            lines.append(
                f"{arm}: the pool's mean test top-1 changes by {pool['mean']:+.2f} points "
                f"(std {_fmt(pool['std'])} over {len(self.seeds)} seeds); "
                f"{summary[arm]['success_rate']['mean']:.0f}% of members improve on average."
            )
        comparisons = self.comparisons()
        for c in comparisons:
            lines.append(
                f"{c.arm} vs {c.control}: {c.mean:+.2f} points per member "
                f"(+/- {_fmt(2 * c.sem)}, 2 s.e. over {c.pairs} seed x member pairs): {c.verdict}."
            )
        against_ce = [c for c in comparisons if c.control == "ce"]
        if not against_ce:
            return lines
        better = [c.arm for c in against_ce if c.verdict == "better"]
        if better:
            verdict = (
                f"Verdict: transfer helps on this data: {', '.join(better)} beat"
                f"{'s' if len(better) == 1 else ''} cross-entropy fine-tuning for the same steps"
            )
        else:
            worse = [c.arm for c in against_ce if c.verdict == "worse"]
            how = f"{', '.join(worse)} did worse" if worse else "no clear difference"
            verdict = (
                "Verdict: transfer does not help on this data: no transfer arm beats "
                f"cross-entropy fine-tuning for the same steps ({how})"
            )
        against_kd = [c for c in comparisons if c.control == "all"]
        if against_kd:
            verdict += "; against plain KD, the partition gives: " + ", ".join(
                f"{c.arm} {c.verdict}" for c in against_kd
            )
        lines.append(verdict + ".")
        return lines

    # -- output -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "pool": self.pool,
            "test_data": self.test_data,
            "store": self.store,
            "num_test_samples": self.num_samples,
            "arms": {
                arm: {
                    "description": ARMS_BY_NAME[arm].description,
                    "control": ARMS_BY_NAME[arm].control,
                }
                for arm in self.arms
            },
            "runs": {
                arm: {
                    str(seed): {"dir": self.run_dirs[arm][seed], **report.to_dict()}
                    for seed, report in by_seed.items()
                }
                for arm, by_seed in self.runs.items()
            },
            "summary": self.summary(),
            "comparisons": [asdict(c) for c in self.comparisons()],
            "conclusion": self.conclusion(),
            "seconds": self.seconds,
        }

    def tables(self) -> list[Table]:
        """Per-member deltas of every arm (mean +/- std over seeds), then the comparisons."""
        summary = self.summary()
        deltas = Table(
            title=f"Transfer on the digits test split ({self.num_samples} images): change in "
            f"top-1 (points), mean +/- std over {len(self.seeds)} seeds",
            caption="; ".join(f"{a}: {ARMS_BY_NAME[a].description}" for a in self.arms),
        )
        deltas.add_column("member")
        deltas.add_column("top-1 before", justify="right")
        for arm in self.arms:
            deltas.add_column(
                arm + (" (control)" if ARMS_BY_NAME[arm].control else ""), justify="right"
            )
        for member in self.members:
            cells = [_delta_cell(summary[arm]["members"][member]["delta"]) for arm in self.arms]
            deltas.add_row(member, f"{self.top1_before(member):.2f}", *cells)
        deltas.add_section()
        deltas.add_row("pool mean", "", *(_delta_cell(summary[a]["pool_delta"]) for a in self.arms))
        deltas.add_row(
            "members improved",
            "",
            *(f"{summary[a]['success_rate']['mean']:.0f}%" for a in self.arms),
        )

        compared = Table(title="Transfer arms against the controls, paired by seed and member")
        for column in ("arm", "control", "arm - control", "2 s.e.", "pairs", "verdict"):
            compared.add_column(
                column, justify="left" if column in ("arm", "control", "verdict") else "right"
            )
        for c in self.comparisons():
            colour = {"better": "green", "worse": "red"}.get(c.verdict, "white")
            compared.add_row(
                c.arm,
                c.control,
                f"{c.mean:+.2f}",
                _fmt(2 * c.sem),
                str(c.pairs),
                f"[{colour}]{c.verdict}[/{colour}]",
            )
        return [deltas, compared]

    def print(self, console: Console) -> None:
        for table in self.tables():
            console.print(table)
        for line in self.conclusion():
            console.print(line)

    def plot(self, path: str | os.PathLike) -> Path:
        """Two panels: each member's delta per arm (mean, std over seeds as error bars); each
        transfer arm minus each control (mean, 2 standard errors)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        summary = self.summary()
        groups = [f"{m}\n(before {self.top1_before(m):.1f}%)" for m in self.members]
        groups.append("pool mean")
        x = np.arange(len(groups))
        width = 0.8 / len(self.arms)
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(12.0, 4.5), constrained_layout=True, width_ratios=(3, 2)
        )
        fig.suptitle(
            f"fastkd demo: transfer on the digits test split ({self.num_samples} images), "
            f"{len(self.seeds)} seeds"
        )
        for i, arm in enumerate(self.arms):
            stats = [summary[arm]["members"][m]["delta"] for m in self.members]
            stats.append(summary[arm]["pool_delta"])
            left.bar(
                x + (i - (len(self.arms) - 1) / 2) * width,
                [s["mean"] for s in stats],
                width,
                yerr=[0.0 if math.isnan(s["std"]) else s["std"] for s in stats],
                capsize=3,
                label=arm + (" (control)" if ARMS_BY_NAME[arm].control else ""),
                hatch="//" if ARMS_BY_NAME[arm].control else None,
            )
        left.axhline(0.0, color="black", linewidth=0.8)
        left.set_xticks(x, groups)
        left.set_ylabel("change in test top-1 (points)")
        left.set_title("Delta per member (error bar: std over seeds)")
        left.legend(fontsize=8)

        comparisons = self.comparisons()
        labels = [f"{c.arm} - {c.control}" for c in comparisons]
        colours = [
            {"better": "#2e8b57", "worse": "#c0392b"}.get(c.verdict, "#777777") for c in comparisons
        ]
        y = np.arange(len(comparisons))
        right.barh(
            y,
            [c.mean for c in comparisons],
            xerr=[0.0 if math.isnan(c.sem) else 2 * c.sem for c in comparisons],
            color=colours,
            capsize=3,
        )
        right.axvline(0.0, color="black", linewidth=0.8)
        right.set_yticks(y, labels)
        right.invert_yaxis()
        right.set_xlabel("top-1 difference per member (points)")
        right.set_title("Transfer arm minus control (error bar: 2 s.e.)")

        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``report.json``, ``report.png`` and ``report.txt`` (the printed tables) in ``out_dir``."""
        stem = Path(out_dir) / REPORT_STEM
        json_path, png_path, txt_path = (stem.with_suffix(s) for s in (".json", ".png", ".txt"))
        write_json(json_path, self.to_dict())
        self.plot(png_path)
        console = Console(record=True, width=140, file=io.StringIO())
        self.print(console)
        txt_path.write_text(console.export_text())
        return {"json": json_path, "plot": png_path, "table": txt_path}


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _delta_cell(stat: Mapping[str, float]) -> str:
    colour = "green" if stat["mean"] > 0 else "red" if stat["mean"] < 0 else "white"
    spread = "" if math.isnan(stat["std"]) else f" +/- {stat['std']:.2f}"
    return f"[{colour}]{stat['mean']:+.2f}[/{colour}]{spread}"
