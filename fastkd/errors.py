"""The errors fastkd raises on bad input: one root, one class per area.

Every message names what is wrong and where: the file, the sample, the argument. The CLI shows
``FastKDError`` (and ``OSError``, whose messages name the file) as one line on stderr and exits
with ``USER_ERROR_EXIT``; anything else is a bug and keeps its traceback.

Each class also derives from the builtin a caller would expect (``ValueError`` for bad values,
``FileExistsError`` for a run that exists), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

USER_ERROR_EXIT = 2  # the exit code of every command on bad input (as click's usage errors)


class FastKDError(Exception):
    """The root: input fastkd cannot use, explained."""


class ConfigError(FastKDError, ValueError):
    """An argument, option or configuration value that cannot be used (the message names it)."""


class RunExistsError(ConfigError, FileExistsError):
    """A training run's folder holds a run already (resume it, or choose another folder)."""


class DatasetError(FastKDError, ValueError):
    """A data set that cannot be used (the message names the file or line)."""


class BadImageError(DatasetError):
    """An image that cannot be read or decoded."""

    def __init__(self, path: Path, sample: int, reason: str) -> None:
        super().__init__(
            f"cannot read image {path} (sample {sample}): {reason}. "
            "Fix or remove the file, or skip unreadable images (--on-bad-image skip)."
        )
        self.path = path
        self.sample = sample
        self.reason = reason


class CheckpointError(FastKDError, ValueError):
    """A checkpoint that cannot be used for the requested model (the message names the file)."""


class StoreError(FastKDError, RuntimeError):
    """A store that cannot be used as asked (the message names the store)."""


class StoreMismatchError(StoreError, ValueError):
    """The store's configuration differs from the requested one; ``differences`` says how."""

    def __init__(self, path: Path | str, differences: Sequence[str], hint: str = "") -> None:
        self.path = Path(path)
        self.differences = list(differences)
        lines = "\n".join(f"  {d}" for d in self.differences)
        super().__init__(
            f"store {self.path} does not match:\n{lines}" + (f"\n{hint}" if hint else "")
        )


class StoreBusyError(StoreError):
    """Another live writer holds the store (an overlapping part claim or the creation lock)."""


class NonFiniteError(FastKDError, FloatingPointError):
    """A NaN or inf stopped training; the message names the step and the samples."""
