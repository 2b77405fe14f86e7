"""The demo's report: tables, the verdict on the declared questions, JSON, PNG and text.

Everything printed or saved is rendered from one ``summary`` (``fastkd.demo.analysis``), so the
tables, the plot and the verdict cannot disagree. A report is built from predictions alone (the
tests build one by hand) and saves them, every member's on every test image for every arm and
seed, with its provenance: ``DemoReport.recompute`` rebuilds every number from a saved report
without training (``fastkd demo --report-from``). It reads the arms and questions from
``fastkd.demo.config``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from fastkd.demo.analysis import Runs, analyse
from fastkd.demo.config import ARMS_BY_NAME
from fastkd.demo.predictions import FoldPredictions
from fastkd.errors import ConfigError
from fastkd.files import write_json
from fastkd.statistics import Interval

REPORT_STEM = "report"  # report.json, report.png, report.txt in the output folder
_VERDICT_COLOUR = {"better": "green", "worse": "red"}


@dataclass
class DemoReport:
    """The demo's settings, pool, timings, predictions and the numbers ``analyse`` computed."""

    config: dict[str, Any]
    pool: dict[int, list[dict[str, Any]]]  # fold -> each member's description
    summary: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    numerics: dict[str, Any] = field(default_factory=dict)  # runtime.reproducible()
    before: dict[int, FoldPredictions] = field(default_factory=dict)  # the pool, per fold
    after: dict[str, dict[int, dict[int, FoldPredictions]]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # demo.provenance

    @classmethod
    def build(
        cls,
        *,
        config: dict[str, Any],
        pool: dict[int, list[dict[str, Any]]],
        before: Mapping[int, FoldPredictions],
        after: Mapping[str, Runs],
        resamples: int,
        seconds: dict[str, float] | None = None,
        numerics: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> DemoReport:
        members = [member["name"] for member in next(iter(pool.values()))]
        summary = analyse(members, before, after, resamples=resamples)
        return cls(
            config,
            pool,
            summary,
            dict(seconds or {}),
            dict(numerics or {}),
            dict(before),
            {arm: {f: dict(by_seed) for f, by_seed in runs.items()} for arm, runs in after.items()},
            dict(provenance or {}),
        )

    @classmethod
    def recompute(cls, saved: Mapping[str, Any]) -> DemoReport:
        """Every table, interval and verdict of a saved report (``to_dict``), computed again
        from its predictions by this code; its timings and provenance as saved."""
        if "predictions" not in saved:
            raise ConfigError(
                "this report holds no predictions (saved by an older fastkd): it cannot be "
                "recomputed; run the demo again"
            )
        found = saved["predictions"]
        before = {int(f): FoldPredictions.from_dict(p) for f, p in found["before"].items()}
        after = {
            arm: {
                int(f): {int(s): FoldPredictions.from_dict(p) for s, p in by_seed.items()}
                for f, by_seed in runs.items()
            }
            for arm, runs in found["after"].items()
        }
        return cls.build(
            config=saved["config"],
            pool={int(f): members for f, members in saved["pool"].items()},
            before=before,
            after=after,
            resamples=int(saved["config"]["resamples"]),
            seconds=saved.get("seconds"),
            numerics=saved.get("numerics"),
            provenance=saved.get("provenance"),
        )

    @property
    def members(self) -> list[str]:
        return list(self.summary["top1_before"])

    @property
    def arms(self) -> list[str]:
        return list(self.summary["arms"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "pool": {str(fold): members for fold, members in self.pool.items()},
            "summary": self.summary,
            "seconds": self.seconds,
            "numerics": self.numerics,
            "provenance": self.provenance,
            "predictions": {
                "before": {str(f): p.to_dict() for f, p in self.before.items()},
                "after": {
                    arm: {
                        str(f): {str(s): p.to_dict() for s, p in by_seed.items()}
                        for f, by_seed in runs.items()
                    }
                    for arm, runs in self.after.items()
                },
            },
        }

    # -- text ----------------------------------------------------------------------------------

    def _scope(self) -> str:
        s = self.summary
        folds, seeds = len(s["folds"]), len(s["seeds"])
        return (
            f"{s['images']} test images ({folds} fold{'s' * (folds > 1)} of "
            f"{self.config['folds']}), {len(self.members)} members, {seeds} seed{'s' * (seeds > 1)}"
        )

    def _resampled(self) -> str:
        """What the intervals resample: images, and the transfer seeds when there are several."""
        seeds = len(self.summary["seeds"])
        if seeds > 1:
            return f"test images and the {seeds} transfer seeds, within folds"
        return "test images within folds; one transfer seed, so not the spread of training"

    def tables(self) -> list[Table]:
        s = self.summary
        pool = Table(title=f"The pool before transfer, on {self._scope()}")
        for column in ("member", "arch", "trained on", "test top-1"):
            pool.add_column(column, justify="right" if column == "test top-1" else "left")
        first = next(iter(self.pool.values()))
        for member in first:
            focus = member["focus"]
            seen = (
                f"all of digits {','.join(map(str, focus))}, {member['rest_fraction']:.0%} of "
                f"the rest (~{member['images']} images), {member['epochs']} epochs"
                if focus
                else f"{member['images']} images, {member['epochs']} epochs"
            )
            pool.add_row(
                member["name"], member["arch"], seen, f"{s['top1_before'][member['name']]:.1f}%"
            )

        control = ARMS_BY_NAME[s["control"]].title
        arms = Table(
            title="Change in test top-1 per arm (points; 95% paired-bootstrap interval over "
            f"{self._resampled()})",
            caption="gain / loss: % of test images a member got wrong before and right after / "
            f"the reverse; success: % of members whose change beats their change under {control} "
            "with the interval above 0 (in brackets: Roth et al.'s rate, % of runs whose change "
            "is > 0).",
        )
        arms.add_column("arm")
        for member in self.members:
            arms.add_column(member, justify="right")
        for column in ("pool", "gain / loss", "success"):
            arms.add_column(column, justify="right")
        for arm in self.arms:
            a = s["arms"][arm]
            cells = [_interval_cell(a["members"][m]["delta"]) for m in self.members]
            gain = np.mean([a["members"][m]["knowledge_gain"] for m in self.members])
            loss = np.mean([a["members"][m]["knowledge_loss"] for m in self.members])
            arms.add_row(
                f"{ARMS_BY_NAME[arm].title} ({arm})",
                *cells,
                _interval_cell(a["pool_delta"]),
                f"{gain:.1f} / {loss:.1f}",
                ("control" if a["success_rate"] is None else f"{a['success_rate']:.0f}%")
                + f" ({a['success_rate_roth']:.0f}%)",
            )

        roth = Table(
            title="Transfer metrics per arm, mean over (teacher, student) pairs of the pool",
            caption="positive flips: % of test images a teacher (before) gets right and the "
            "student wrong, before and after transfer; transfer rate: Roth et al.'s (their code: "
            "per class, can exceed 100%) and per sample (the flipped images themselves). "
            "docs/metrics.md.",
        )
        for column in ("arm", "positive flips", "rate (Roth)", "rate (per sample)"):
            roth.add_column(column, justify="left" if column == "arm" else "right")
        for arm in self.arms:
            figures = s["arms"][arm]["members"]
            roth.add_row(
                f"{ARMS_BY_NAME[arm].title} ({arm})",
                f"{_fmt(_pairs_mean(figures, 'positive_flips'), '.1f')} -> "
                f"{_fmt(_pairs_mean(figures, 'positive_flips_after'), '.1f')}",
                _fmt(_pairs_mean(figures, "transfer_rate_per_class"), ".0f", "%"),
                _fmt(_pairs_mean(figures, "transfer_rate_per_sample"), ".0f", "%"),
            )

        questions = Table(
            title="The declared questions: arm minus control on the same images",
            caption="knowledge loss: % of test images a member got right before transfer and "
            "wrong after (Roth et al.'s forgotten samples), arm / control, and their difference.",
        )
        columns = ("role", "arm", "control", "difference", "95% interval", "verdict",
                   "knowledge loss", "loss difference")  # fmt: skip
        for column in columns:
            questions.add_column(column, justify="right" if column in ("difference",) else "left")
        for q in s["questions"]:
            d, lost = q["difference"], q["knowledge_loss"]
            colour = _VERDICT_COLOUR.get(q["verdict"], "white")
            questions.add_row(
                q["role"],
                ARMS_BY_NAME[q["arm"]].title,
                ARMS_BY_NAME[q["control"]].title,
                f"{d['estimate']:+.2f}",
                f"[{d['low']:+.2f}, {d['high']:+.2f}]",
                f"[{colour}]{q['verdict']}[/{colour}]",
                f"{lost['arm']:.2f} / {lost['control']:.2f}",
                _interval_text(lost["difference"]),
            )
        return [pool, arms, roth, questions]

    def conclusion(self) -> list[str]:
        """One sentence per declared question, saying what its interval supports."""
        lines = []
        for q in self.summary["questions"]:
            d, lost = q["difference"], q["knowledge_loss"]
            lines.append(
                f"{q['role'].capitalize()}: {ARMS_BY_NAME[q['arm']].title} minus "
                f"{ARMS_BY_NAME[q['control']].title}: {d['estimate']:+.2f} points per member and "
                f"test image, 95% interval [{d['low']:+.2f}, {d['high']:+.2f}] over "
                f"{self._scope()} (resampling {self._resampled()}): {q['verdict']}. Knowledge "
                f"lost: {lost['arm']:.2f}% vs {lost['control']:.2f}% of test images, difference "
                f"{_interval_text(lost['difference'])}."
            )
        return lines

    def print(self, console: Console) -> None:
        for table in self.tables():
            console.print(table)
        for line in self.conclusion():
            console.print(line)

    # -- files ---------------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike) -> Path:
        """Four panels: each arm's change per member with its interval; gain vs loss per arm;
        the declared questions; the pool's agreement before and after the primary arm."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s, path = self.summary, Path(path)
        fig, axes = plt.subplots(2, 2, figsize=(13.0, 9.0), constrained_layout=True)
        fig.suptitle(f"fastkd demo: transfer on {self._scope()}")

        ax = axes[0, 0]
        groups = [*self.members, "pool"]
        width = 0.8 / len(self.arms)
        x = np.arange(len(groups))
        for i, arm in enumerate(self.arms):
            a = s["arms"][arm]
            stats = [a["members"][m]["delta"] for m in self.members] + [a["pool_delta"]]
            mid = np.array([t["estimate"] for t in stats])
            err = np.array([[t["estimate"] - t["low"], t["high"] - t["estimate"]] for t in stats]).T
            ax.bar(x + (i - (len(self.arms) - 1) / 2) * width, mid, width, yerr=err, capsize=2,
                   label=ARMS_BY_NAME[arm].title)  # fmt: skip
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [f"{g}\n(before {s['top1_before'][g]:.0f}%)" if g in s["top1_before"]
                          else g for g in groups])  # fmt: skip
        ax.set_ylabel("change in test top-1 (points)")
        ax.set_title("Change per member and arm (95% interval)")
        ax.legend(fontsize=7, ncol=2)

        ax = axes[0, 1]
        y = np.arange(len(self.arms))
        gain = [np.mean([s["arms"][a]["members"][m]["knowledge_gain"] for m in self.members])
                for a in self.arms]  # fmt: skip
        loss = [np.mean([s["arms"][a]["members"][m]["knowledge_loss"] for m in self.members])
                for a in self.arms]  # fmt: skip
        ax.barh(y, gain, color="#2e8b57", label="knowledge gain")
        ax.barh(y, [-v for v in loss], color="#c0392b", label="knowledge loss")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [ARMS_BY_NAME[a].title for a in self.arms])
        ax.invert_yaxis()
        ax.set_xlabel("% of test images (mean over members)")
        ax.set_title("Gained vs lost images")
        ax.legend(fontsize=8)

        ax = axes[1, 0]
        qs = s["questions"]
        y = np.arange(len(qs))
        for i, q in enumerate(qs):
            d = q["difference"]
            colour = {"better": "#2e8b57", "worse": "#c0392b"}.get(q["verdict"], "#555555")
            ax.errorbar(d["estimate"], i, xerr=[[d["estimate"] - d["low"]], [d["high"] - d["estimate"]]],
                        fmt="o", color=colour, capsize=4)  # fmt: skip
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(y, [f"{q['role']}: {ARMS_BY_NAME[q['arm']].title}\nminus "
                          f"{ARMS_BY_NAME[q['control']].title}\n({q['verdict']})" for q in qs])  # fmt: skip
        ax.set_ylim(len(qs) - 0.5, -0.5)
        ax.set_xlabel("difference in test top-1 (points, 95% interval)")
        ax.set_title("The declared questions")

        ax = axes[1, 1]
        primary = next((q["arm"] for q in qs if q["role"] == "primary"), self.arms[0])
        before = np.asarray(s["agreement_before"])
        after = np.asarray(s["arms"][primary]["agreement_after"])
        n = len(self.members)
        both = np.full((n, 2 * n + 1), np.nan)
        both[:, :n], both[:, n + 1 :] = before, after
        image = ax.imshow(np.ma.masked_invalid(both), cmap="viridis", vmin=0.0, vmax=100.0)
        for i in range(n):
            for j in range(n):
                for offset, matrix in ((0, before), (n + 1, after)):
                    ax.text(j + offset, i, f"{matrix[i, j]:.0f}", ha="center", va="center",
                            color="white" if matrix[i, j] < 60 else "black", fontsize=8)  # fmt: skip
        ax.set_xticks(list(range(n)) + list(range(n + 1, 2 * n + 1)), self.members * 2, rotation=30)
        ax.set_yticks(range(n), self.members)
        ax.set_title(f"Agreement (% same class): before | after {ARMS_BY_NAME[primary].title}")
        fig.colorbar(image, ax=ax, shrink=0.7, label="%")

        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``report.json``, ``report.png`` and ``report.txt`` (the printed tables) in ``out_dir``."""
        stem = Path(out_dir) / REPORT_STEM
        json_path, png_path, txt_path = (stem.with_suffix(s) for s in (".json", ".png", ".txt"))
        write_json(json_path, self.to_dict())
        self.plot(png_path)
        console = Console(record=True, width=160, file=io.StringIO())
        self.print(console)
        txt_path.write_text(console.export_text())
        return {"json": json_path, "plot": png_path, "table": txt_path}


def _fmt(value: float, spec: str, unit: str = "") -> str:
    return "n/a" if math.isnan(value) else f"{value:{spec}}{unit}"


def _pairs_mean(figures: Mapping[str, Mapping[str, Any]], name: str) -> float:
    """The mean of a per-teacher figure over every (teacher, student) pair that defines it."""
    values = [v for member in figures.values() for v in member[name].values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _interval_text(interval: Mapping[str, Any]) -> str:
    return f"{interval['estimate']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def _interval_cell(interval: Mapping[str, Any]) -> str:
    """The estimate, coloured by what its interval supports (``Interval.verdict``)."""
    mid = interval["estimate"]
    if math.isnan(mid):
        return "n/a"
    colour = _VERDICT_COLOUR.get(Interval(**interval).verdict(), "white")
    return f"[{colour}]{mid:+.2f}[/{colour}] [{interval['low']:+.1f}, {interval['high']:+.1f}]"
