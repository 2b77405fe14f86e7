"""What a demo result was measured with: the code (its commit and a hash of its sources), the
versions of what ran it, and the machine, so that a saved report can be tied to the code that
made it and recomputed (``DemoReport.recompute``)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

from fastkd.demo.config import code_version


def git_commit(root: Path) -> dict[str, Any] | None:
    """The commit ``root`` is checked out at, and whether the library's sources differ from it
    (None outside a git checkout, or without git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", "fastkd", "kernels", "cli")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "sources_differ_from_commit": bool(changed)}


def provenance(device: str) -> dict[str, Any]:
    """The code, versions and machine of a demo run (JSON-able)."""
    import numpy
    import timm
    import torch

    from fastkd.runtime.progress import machine_name
    from fastkd.version import __version__

    root = Path(__file__).resolve().parents[2]  # the checkout holding fastkd/ (editable install)
    return {
        "code_version": code_version(),  # sha256 of fastkd's and its kernels' Python sources
        "git": git_commit(root) if (root / ".git").exists() else None,
        "versions": {
            "fastkd": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": numpy.__version__,
        },
        "machine": machine_name(None if device == "auto" else device),
        "platform": platform.platform(),
    }
