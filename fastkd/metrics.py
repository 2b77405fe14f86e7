"""Transfer metrics (Roth et al., ICLR 2024): what each pool member gained from the others.

All figures are percentages of the evaluation samples (points), computed from per-sample
correctness, so they are exact and need no model to test:

- top-1 before / after, and the transfer delta ``after - before``;
- knowledge gain: samples the model got wrong before and right after; knowledge loss: the reverse
  (``delta = gain - loss``);
- positive flips of model ``m`` against another member ``o``: samples where ``o`` was right and
  ``m`` wrong, both before training (what ``o`` could teach ``m``);
- transfer rate of ``m`` from ``o``: the share of those flips that ``m`` gets right after training;
- the pool's success rate: the share of trained models whose delta is positive (docs/method.md says
  "pairs": in a role-agnostic pool every trained member is one student of the others).

``transfer_report`` turns per-sample predictions (``fastkd.evaluation`` makes them) into a
``TransferReport`` with JSON, a rich table and a PNG plot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastkd.errors import ConfigError
from fastkd.files import write_json


def _percent(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean()) if mask.size else math.nan


@dataclass
class ModelTransfer:
    """One model's transfer figures, in percent of the evaluation samples."""

    name: str
    top1_before: float
    top1_after: float
    delta: float
    knowledge_gain: float
    knowledge_loss: float
    positive_flips: dict[str, float]  # other member -> % where it was right and this model wrong
    transfer_rate: dict[str, float]  # other member -> % of those flips this model now gets right


@dataclass
class TransferReport:
    """Per-model transfer figures and the pool's success rate."""

    models: list[ModelTransfer]
    success_rate: float
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TransferReport:
        def undefined_as_nan(rates: dict) -> dict:
            return {k: math.nan if v is None else v for k, v in rates.items()}

        return cls(
            models=[
                ModelTransfer(**{**m, "transfer_rate": undefined_as_nan(m["transfer_rate"])})
                for m in values["models"]
            ],
            success_rate=values["success_rate"],
            num_samples=values["num_samples"],
        )

    def save(self, stem: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.png``; returns both paths."""
        stem = Path(stem)
        return self.save_json(stem.with_suffix(".json")), self.plot(stem.with_suffix(".png"))

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (NaN, where a rate is undefined, is written as null)."""
        path = Path(path)
        write_json(path, self.to_dict())
        return path

    def table(self):
        """A rich table: one row per model, the flips and transfer rates per other member."""
        from rich.table import Table

        table = Table(
            title=f"Transfer on {self.num_samples} samples: pool success rate "
            f"{self.success_rate:.0f}%",
            caption="All figures in % of samples; flips and rates are per other pool member "
            "(flips: it was right and this model wrong before; rate: share of those now right).",
        )
        for column in ("model", "top-1 before", "top-1 after", "delta", "gain", "loss"):
            table.add_column(column, justify="left" if column == "model" else "right")
        table.add_column("positive flips -> transfer rate")
        for m in self.models:
            colour = "green" if m.delta > 0 else "red" if m.delta < 0 else "white"
            flips = ", ".join(
                f"{other} {m.positive_flips[other]:.1f} -> {_format_rate(m.transfer_rate[other])}"
                for other in m.positive_flips
            )
            table.add_row(
                m.name,
                f"{m.top1_before:.2f}",
                f"{m.top1_after:.2f}",
                f"[{colour}]{m.delta:+.2f}[/{colour}]",
                f"{m.knowledge_gain:.2f}",
                f"{m.knowledge_loss:.2f}",
                flips or "-",
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
        fig.suptitle(
            f"Knowledge transfer on {self.num_samples} samples: pool success rate "
            f"{self.success_rate:.0f}%"
        )

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
                [[m.transfer_rate.get(o, math.nan) for o in others] for m in self.models]
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
                        text = f"{rates[i, j]:.0f}%\nof {m.positive_flips[o]:.1f}% flips"
                        colour = "black" if rates[i, j] > 60 else "white"
                    ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
            ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("teacher: the other pool member")
            ax.set_ylabel("student: the trained model")
            ax.set_title("Transfer rate (share of positive flips learnt)")
            fig.colorbar(image, ax=ax, shrink=0.8, label="%")

        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _format_rate(rate: float) -> str:
    return "n/a" if math.isnan(rate) else f"{rate:.0f}%"


def _correct(predictions: np.ndarray, labels: np.ndarray, name: str) -> np.ndarray:
    predictions = np.asarray(predictions)
    if predictions.shape != labels.shape:
        raise ConfigError(
            f"predictions of {name!r} have shape {predictions.shape}, the labels {labels.shape}"
        )
    return predictions == labels


def transfer_report(
    labels: np.ndarray,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
) -> TransferReport:
    """Transfer figures of every model in ``after`` from per-sample predictions.

    labels: int [n]. before: predictions [n] of every pool member before training (members that
    were not trained are the others' reference for positive flips). after: predictions [n] of
    the trained models, each also present in ``before``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {labels.shape}")
    missing = sorted(set(after) - set(before))
    if missing:
        raise ConfigError(f"no 'before' predictions for trained model(s) {missing}")
    right_before = {name: _correct(p, labels, name) for name, p in before.items()}
    models = []
    for name, predictions in after.items():
        was, now = right_before[name], _correct(predictions, labels, name)
        flips, rates = {}, {}
        for other, other_was in right_before.items():
            if other == name:
                continue
            flip = other_was & ~was
            flips[other] = _percent(flip)
            rates[other] = _percent(now[flip])
        top1_before, top1_after = _percent(was), _percent(now)
        models.append(
            ModelTransfer(
                name=name,
                top1_before=top1_before,
                top1_after=top1_after,
                delta=top1_after - top1_before,
                knowledge_gain=_percent(~was & now),
                knowledge_loss=_percent(was & ~now),
                positive_flips=flips,
                transfer_rate=rates,
            )
        )
    success = _percent(np.array([m.delta > 0 for m in models])) if models else math.nan
    return TransferReport(models=models, success_rate=success, num_samples=int(labels.size))
