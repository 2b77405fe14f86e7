"""What the benchmarks share about their device: defaults that differ on a GPU and on a CPU (a
GPU run measures the sizes users run; a CPU run must end in minutes on 2 cores), and the
synchronisation that makes a host clock mean the device's time."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch

from fastkd.runtime import resolve_device


def resolve_with_defaults(
    args: argparse.Namespace, defaults: Mapping[str, tuple[object, object]]
) -> torch.device:
    """``args.device`` resolved; each option of ``defaults`` (name -> (GPU value, CPU value))
    left unset on the command line set to the value of that device."""
    device = resolve_device(args.device)
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if device.type == "cuda" else cpu)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so the host's clock covers it (a no-op off a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
