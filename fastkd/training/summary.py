"""What an epoch leaves behind: its record, its log line, and the results where users already
look: timm's ``summary.csv`` and TensorBoard scalars.

The CSV is rewritten whole from the run's history after every epoch (atomically), so a resumed
run, whose history comes back from the run state, never repeats a row. TensorBoard scalars go to
``<out_dir>/tensorboard`` when ``torch.utils.tensorboard`` imports (the tensorboard package is not
a dependency); otherwise they are skipped without a word.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastkd.files import atomic_write_text

SUMMARY_FILE = "summary.csv"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class EpochRecord:
    epoch: int  # 1-based: epochs completed
    steps: int  # global steps completed
    loss: float  # mean training loss over the epoch's rows
    taught: float  # share of rows that had a KD target (nan without KD)
    val_top1: dict[str, float]  # per trained model; empty without val_data
    seconds: float
    steps_per_second: float
    lr: dict[str, float] = field(default_factory=dict)  # per trained model, at the epoch's end


def describe_epoch(record: EpochRecord, epochs: int) -> str:
    """One log line per epoch."""
    parts = [f"epoch {record.epoch}/{epochs}: loss {record.loss:.4f}"]
    if not math.isnan(record.taught):
        parts.append(f"{100 * record.taught:.0f}% of rows taught")
    parts += [f"val top-1 {name} {top1:.2f}%" for name, top1 in record.val_top1.items()]
    parts.append(f"{record.steps_per_second:.2f} steps/s")
    return ", ".join(parts)


def summary_header(names: Sequence[str]) -> list[str]:
    """timm's columns (epoch, train_loss, eval top-1, lr), one top-1 and lr per trained model."""
    return [
        "epoch",
        "train_loss",
        "taught",
        *(f"val_top1_{name}" for name in names),
        *(f"lr_{name}" for name in names),
        "seconds",
    ]


def _cell(value: float | None) -> str:
    """``repr`` round-trips a float exactly; nan or missing (no KD, no val data) is empty."""
    if value is None or math.isnan(value):
        return ""
    return repr(float(value))


def summary_text(history: Sequence[EpochRecord], names: Sequence[str]) -> str:
    """The whole CSV of ``history``: the header, then one row per completed epoch."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(summary_header(names))
    for record in history:
        writer.writerow(
            [
                record.epoch,
                _cell(record.loss),
                _cell(record.taught),
                *(_cell(record.val_top1.get(name)) for name in names),
                *(_cell(record.lr.get(name)) for name in names),
                _cell(record.seconds),
            ]
        )
    return buffer.getvalue()


class EpochSummary:
    """Writes ``summary.csv`` and the TensorBoard scalars of each epoch (rank 0 calls it)."""

    def __init__(self, out_dir: Path, names: Sequence[str]) -> None:
        self.out_dir = out_dir
        self.names = list(names)
        self._writer: Any = None  # the SummaryWriter, opened on first use
        self._tensorboard = True  # until the import fails

    def write(self, history: Sequence[EpochRecord]) -> None:
        """Rewrite the CSV from ``history`` and log its last epoch to TensorBoard."""
        atomic_write_text(self.out_dir / SUMMARY_FILE, summary_text(history, self.names))
        if history:
            self._log_scalars(history[-1])

    def _log_scalars(self, record: EpochRecord) -> None:
        writer = self._open_writer()
        if writer is None:
            return
        step = record.epoch
        writer.add_scalar("train/loss", record.loss, step)
        if not math.isnan(record.taught):
            writer.add_scalar("train/taught", record.taught, step)
        for name, top1 in record.val_top1.items():
            writer.add_scalar(f"val/top1/{name}", top1, step)
        for name, lr in record.lr.items():
            writer.add_scalar("lr" if len(record.lr) == 1 else f"lr/{name}", lr, step)
        writer.flush()

    def close(self) -> None:
        """Close the TensorBoard event file (each epoch's scalars were flushed already)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open_writer(self) -> Any:
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR))
        return self._writer
