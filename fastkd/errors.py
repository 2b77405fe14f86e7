"""The errors fastkd raises on bad input: one root, one class per area.

Every message names what is wrong and where: the file, the sample, the argument. The CLI shows
``FastKDError`` (and ``OSError``, whose messages name the file) as one line on stderr and exits
with ``USER_ERROR_EXIT``; anything else is a bug and keeps its traceback.

Each class also derives from the builtin a caller would expect (``ValueError`` for bad values,
``FileExistsError`` for a run that exists), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import builtins
import errno
import os
from collections.abc import Callable, Sequence
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
    """An image that cannot be read or decoded. Only `fastkd dump` can skip one, so the CLI adds
    that hint there (cli.guard), not here: train and eval have no such option."""

    def __init__(self, path: Path | str, sample: int, reason: str) -> None:
        super().__init__(f"cannot read image {path} (sample {sample}): {reason}. Fix or remove it")
        self.path = path  # the file, or a tar shard's member as ``shard.tar:member``
        self.sample = sample
        self.reason = reason


class CheckpointError(FastKDError, ValueError):
    """A checkpoint that cannot be used for the requested model (the message names the file)."""


class StoreError(FastKDError, RuntimeError):
    """A store that cannot be used as asked (the message names the store)."""


class StorageError(FastKDError, OSError):
    """Object storage that failed a request after its retries (the message names the URL)."""


class ObjectChangedError(StorageError):
    """An object rewritten since its version was taken: a read conditioned on that version
    (``If-Match``) was refused, so no bytes of the new content were taken for the old."""

    def __init__(self, url: str, version: str | None) -> None:
        super().__init__(f"{url}: changed since its version {version} was read")
        self.url, self.version = url, version


class ShardChangedError(DatasetError):
    """A tar shard rewritten since its members were indexed: its offsets no longer hold."""


class StoreMismatchError(StoreError, ValueError):
    """The store's configuration differs from the requested one; ``differences`` says how."""

    def __init__(self, path: Path | str, differences: Sequence[str], hint: str = "") -> None:
        remote = "://" in str(path) or not isinstance(path, str | os.PathLike)
        self.path = path if remote else Path(path)  # an s3:// URL is no local Path
        self.differences = list(differences)
        lines = "\n".join(f"  {d}" for d in self.differences)
        super().__init__(
            f"store {self.path} does not match:\n{lines}" + (f"\n{hint}" if hint else "")
        )


class StoreBusyError(StoreError):
    """Another live writer holds the store (an overlapping part claim or the creation lock)."""


class NonFiniteError(FastKDError, FloatingPointError):
    """A NaN or inf stopped training; the message names the step and the samples."""


class WeightsUnavailableError(FastKDError, RuntimeError):
    """timm's pretrained weights for a model cannot be had (no network, no such weights)."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; quota exceeded
_GROUPS = getattr(builtins, "BaseExceptionGroup", ())  # Python >= 3.11


def find_cause(
    error: BaseException,
    types: type[BaseException] | tuple[type[BaseException], ...],
    where: Callable[[BaseException], bool] | None = None,
) -> BaseException | None:
    """The first exception of ``types`` (and for which ``where`` holds) in ``error``, what it was
    raised from or while handling (as a traceback shows them) and the members of exception
    groups, outermost first.

    Libraries re-raise a user's error as their own (``torch.save`` on a full disk raises a
    RuntimeError over the OSError; task groups raise ExceptionGroups): it is still the user's.
    """
    queue: list[BaseException] = [error]
    seen: set[int] = set()
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, types) and (where is None or where(current)):
            return current
        if isinstance(current, _GROUPS):
            queue.extend(current.exceptions)
        if current.__cause__ is not None:
            queue.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            queue.append(current.__context__)
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is an OSError saying the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
