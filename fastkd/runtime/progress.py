"""How a process reports while it runs: rich progress bars on stderr, and the machine's name that
measured results are labelled with (the benchmarks). torch is imported by ``machine_name`` only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fastkd.runtime.device import resolve_device

if TYPE_CHECKING:
    import torch


class RateColumn(ProgressColumn):
    """Completed units per second (``unit``: steps, img)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        text = f"{speed:,.2f} {self.unit}/s" if speed else f"- {self.unit}/s"
        return Text(text, style="progress.data.speed")


def progress_bar(unit: str, *fields: ProgressColumn, enabled: bool = True) -> Progress:
    """A rich progress bar on stderr: description, bar, done/total, rate, ``fields``, elapsed and
    remaining time. Off (a no-op whose ``console.log`` still prints) when not ``enabled`` or not
    on a terminal, where a redrawn bar would only fill a log file."""
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}", style="bold", markup=False),  # names as given
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *fields,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


def machine_name(device: torch.device | str | None = None) -> str:
    """What results measured on ``device`` (default: ``resolve_device()``) are labelled with: the
    GPU's name and the host's cores, or the CPU's cores (and whether the host has a GPU)."""
    import torch

    cores = os.cpu_count()
    device = resolve_device() if device is None else torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores} CPU cores"
    return f"CPU, {cores} cores, " + ("GPU unused" if torch.cuda.is_available() else "no GPU")
