"""Transfer metrics (Roth et al., ICLR 2024): what each pool member gained from the others.

All figures are percentages of the evaluation samples (points), computed from per-sample
correctness, so they are exact and need no model to test:

- top-1 before / after, and the transfer delta ``after - before``;
- knowledge gain: samples the model got wrong before and right after; knowledge loss: the reverse
  (``delta = gain - loss``);
- positive flips of model ``m`` against another member ``o``: samples where ``o`` was right and
  ``m`` wrong, both before training (what ``o`` could teach ``m``);
- transfer rate of ``m`` from ``o``: the share of those flips that ``m`` gets right after training;
- the pool's success rate: the share of trained models whose delta is positive (method.md says
  "pairs": in a role-agnostic pool every trained member is one student of the others).

``evaluate`` produces the predictions (eval view: centre crop, each model's own preprocessing);
``transfer_report`` turns them into a ``TransferReport`` with JSON, a rich table and a PNG plot.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fastkd.data import ImageDataset, open_dataset, view_loader
from fastkd.files import write_json
from fastkd.models import ModelSpec, load_model
from fastkd.views import AugmentConfig, view_params


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
        raise ValueError(
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
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    missing = sorted(set(after) - set(before))
    if missing:
        raise ValueError(f"no 'before' predictions for trained model(s) {missing}")
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


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; a no-op elsewhere (CPU runs fp32 for exact, portable results)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    models: Mapping[str, torch.nn.Module],
    data_configs: Mapping[str, dict],
    dataset: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    amp: bool = True,
) -> dict[str, np.ndarray]:
    """Top-1 predictions [n] of each model on the eval view of every sample of ``dataset``.

    The eval view is view 0 of ``fastkd.views`` (centre square of ``crop_pct`` x the short side,
    no flip), resized and normalised with each model's own timm data config: timm's eval
    transform. Models sharing a ``crop_pct`` share one decoding pass. Models are left in eval mode.
    """
    device = torch.device(device)
    samples = np.arange(len(dataset), dtype=np.int64)
    by_crop: dict[float, list[str]] = {}
    for name in models:
        crop_pct = float(data_configs[name].get("crop_pct") or AugmentConfig.eval_crop_pct)
        by_crop.setdefault(crop_pct, []).append(name)
    predictions: dict[str, np.ndarray] = {}
    for crop_pct, names in by_crop.items():
        boxes, flips = view_params(
            0, samples, 1, dataset.sizes, AugmentConfig(eval_crop_pct=crop_pct)
        )
        out = {name: np.empty(len(samples), dtype=np.int64) for name in names}
        for name in names:
            models[name].eval()
        batches = view_loader(
            dataset,
            samples,
            np.zeros_like(samples),
            boxes[:, 0],
            flips[:, 0],
            [data_configs[name] for name in names],
            batch_size=batch_size,
            backend=backend,
            device=device,
        )
        for batch in batches:
            rows = batch.samples.numpy()
            for name, images in zip(names, batch.images, strict=True):
                with autocast(device, amp):
                    logits = models[name](images)
                out[name][rows] = logits.argmax(dim=1).cpu().numpy()
        predictions.update(out)
    return predictions


def predict_checkpoints(
    dataset: ImageDataset,
    specs: Sequence[ModelSpec],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> dict[str, np.ndarray]:
    """``evaluate`` of models given as specs (``NAME=CKPT``), loaded one at a time."""
    names = [spec.name for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"model name(s) {twice} given twice; name them apart (alias:ARCH=CKPT)")
    predictions = {}
    for spec in specs:
        loaded = load_model(spec)
        if loaded.num_classes != dataset.num_classes:
            raise ValueError(
                f"model {spec.name!r} ({spec.checkpoint or spec.arch}) has {loaded.num_classes} "
                f"classes, the data set {dataset.root} has {dataset.num_classes}"
            )
        predictions.update(
            evaluate(
                {spec.name: loaded.model.to(device)},
                {spec.name: loaded.data_config},
                dataset,
                batch_size=batch_size,
                device=device,
                backend=backend,
            )
        )
        del loaded
    return predictions


def transfer_from_checkpoints(
    data: str | os.PathLike,
    before: Sequence[ModelSpec],
    after: Sequence[ModelSpec],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> TransferReport:
    """The transfer report of trained checkpoints (``after``) against the pool before training
    (``before``: every member, matched to ``after`` by name), evaluated on ``data``."""
    dataset = open_dataset(data)
    kwargs = {"batch_size": batch_size, "device": device, "backend": backend}
    return transfer_report(
        dataset.labels,
        predict_checkpoints(dataset, before, **kwargs),
        predict_checkpoints(dataset, after, **kwargs),
    )
