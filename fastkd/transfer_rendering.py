"""How a ``TransferReport`` is shown: a rich table, a PNG plot, its JSON and PNG files.

The figures themselves are computed in ``fastkd.metrics`` (figures apart from their rendering,
as timm keeps its metrics apart from its summaries); ``TransferReport`` inherits these methods
from ``TransferRendering``, so a report is still shown with ``report.table()``,
``report.plot(path)`` and saved with ``report.save(stem)``. This module reads only the report's
fields and never imports ``fastkd.metrics``: the dependency runs one way. rich and matplotlib are
imported when a report is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastkd.files import write_json

if TYPE_CHECKING:
    from rich.table import Table


class TransferRendering:
    """The table, plot and files of a ``fastkd.metrics.TransferReport`` (its base class): reads
    its ``models``, ``num_samples``, ``context``, ``control``, ``improved()`` and ``to_dict()``."""

    def _title(self) -> str:
        where = f" of {self.context['data']}" if self.context.get("data") else ""
        if self.control:  # what teaching added, not what any fine-tuning would
            better = sum(c["verdict"] == "better" for c in self.control.values())
            outcome = f"{better} of {len(self.control)} trained models better than their control"
        else:
            outcome = f"{self.improved()} of {len(self.models)} trained models improved"
        return f"Transfer on {self.num_samples} samples{where}: {outcome}"

    def save(self, stem: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.png``; returns both paths."""
        stem = Path(stem)
        return self.save_json(stem.with_suffix(".json")), self.plot(stem.with_suffix(".png"))

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (NaN, where a rate is undefined, is written as null)."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    def table(self) -> Table:
        """A rich table: one row per model; per teacher its positive flips before -> after and
        both transfer rates (per sample | per class, Roth et al.'s code)."""
        from rich.table import Table
        from rich.text import Text

        table = Table(
            title=self._title(),
            caption="All figures in % of samples. Per teacher (another pool member): positive "
            "flips (it right, this model wrong) before -> after training; transfer rate per "
            "sample (share of the flipped samples now right) | per class (Roth et al.'s code: "
            "gains in the flipped samples' classes over the flips; can exceed 100).",
        )
        for column in ("model", "top-1 before", "top-1 after", "delta", "gain", "loss"):
            table.add_column(column, justify="left" if column == "model" else "right")
        table.add_column("teacher: flips before -> after, rate per sample | per class")
        if self.control:
            table.add_column("vs control (95% interval)", justify="right")
        for m in self.models:
            colour = "green" if m.delta > 0 else "red" if m.delta < 0 else "white"
            flips = Text("\n").join(  # Text: a model named "[effnet]" stays "[effnet]"
                Text(
                    f"{other} {m.positive_flips[other]:.1f} -> "
                    f"{m.positive_flips_after[other]:.1f}, "
                    f"{_format_rate(m.transfer_rate_per_sample[other])} | "
                    f"{_format_rate(m.transfer_rate_per_class[other])}"
                )
                for other in m.positive_flips
            )
            table.add_row(
                Text(m.name),
                f"{m.top1_before:.2f}",
                f"{m.top1_after:.2f}",
                f"[{colour}]{m.delta:+.2f}[/{colour}]",
                f"{m.knowledge_gain:.2f}",
                f"{m.knowledge_loss:.2f}",
                flips if m.positive_flips else "-",
                *(
                    [_versus(self.control[m.name])]
                    if self.control and m.name in self.control
                    else ["-"] * bool(self.control)
                ),
            )
        return table

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: top-1 before/after with deltas, gain/loss, and a transfer-rate matrix."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        names = [m.name for m in self.models]
        # Trained models first, in the same order as the rows, so "self" lies on the diagonal.
        others = names + sorted({o for m in self.models for o in m.positive_flips} - set(names))
        if len(others) < 2:
            others = []
        x = np.arange(len(names))
        panels = 3 if others else 2
        fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.2), constrained_layout=True)
        fig.suptitle(self._title())

        ax = axes[0]
        before = [m.top1_before for m in self.models]
        after = [m.top1_after for m in self.models]
        ax.bar(x - 0.2, before, 0.4, label="before", color="#b0b0b0")
        ax.bar(x + 0.2, after, 0.4, label="after", color="#3572b0")
        for i, m in enumerate(self.models):
            colour = "#2e8b57" if m.delta > 0 else "#c0392b" if m.delta < 0 else "#555555"
            ax.annotate(
                f"{m.delta:+.2f}",
                (x[i] + 0.2, m.top1_after),
                ha="center",
                va="bottom",
                color=colour,
                fontweight="bold",
            )
        low = min(before + after)
        ax.set_ylim(max(0.0, low - 10.0), 109.0)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("Accuracy before and after (delta in points)")
        ax.legend(loc="upper left", ncol=2, fontsize=8)

        ax = axes[1]
        gain = [m.knowledge_gain for m in self.models]
        loss = [-m.knowledge_loss for m in self.models]
        ax.bar(x, gain, 0.6, color="#2e8b57", label="knowledge gain")
        ax.bar(x, loss, 0.6, color="#c0392b", label="knowledge loss")
        ax.scatter(x, [m.delta for m in self.models], color="black", zorder=3, label="net delta")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel("% of samples")
        ax.set_title("Samples gained and lost")
        ax.legend(loc="best")

        if others:
            ax = axes[2]
            rates = np.array(
                [[m.transfer_rate_per_sample.get(o, math.nan) for o in others] for m in self.models]
            )
            image = ax.imshow(np.ma.masked_invalid(rates), cmap="viridis", vmin=0.0, vmax=100.0)
            ax.set_facecolor("#eeeeee")
            for i, m in enumerate(self.models):
                for j, o in enumerate(others):
                    if o == m.name:
                        text, colour = "self", "#777777"
                    elif math.isnan(rates[i, j]):
                        text, colour = "no flips", "#777777"
                    else:
                        text = (
                            f"{rates[i, j]:.0f}% ({_format_rate(m.transfer_rate_per_class[o])})"
                            f"\nof {m.positive_flips[o]:.1f}% flips"
                        )
                        colour = "black" if rates[i, j] > 60 else "white"
                    ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
            ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("teacher: the other pool member")
            ax.set_ylabel("student: the trained model")
            ax.set_title("Transfer rate per sample (per class, Roth)")
            fig.colorbar(image, ax=ax, shrink=0.8, label="%")

        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _format_rate(rate: float) -> str:
    return "n/a" if math.isnan(rate) else f"{rate:.0f}%"


def _versus(control: Mapping) -> str:
    """A control comparison as a table cell: the difference in points and its interval."""
    return f"{control['difference']:+.2f} [{control['low']:+.2f}, {control['high']:+.2f}]"
