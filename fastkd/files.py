"""Atomic file writes: a reader (or a resumed run after a kill) sees the old file or the new one,
never half of one. The one home for this; checkpoints, reports, claims and markers use it."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fastkd.runtime import json_default


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto
    ``path`` (atomic on POSIX within one file system). The temp file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.chmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp's 0600: the user's umask
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask (read by setting it, then restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sweep_temp_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temp files an ``atomic_write`` of ``folder/name`` left when it was killed
    (``.<name>.*.tmp``); call only where no other process writes ``name``. Returns them."""
    stale = sorted(Path(folder).glob(f".{name}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_torch_save(path: str | os.PathLike, payload: Any) -> Path:
    import torch

    return atomic_write(path, lambda handle: torch.save(payload, handle))


def write_json(
    path: str | os.PathLike,
    value: Any,
    *,
    default: Callable[[Any], Any] = json_default,
    indent: int = 2,
) -> Path:
    """JSON, atomically; NaN becomes null (strict JSON has no NaN); paths, enums and numpy
    values in their JSON form (``runtime.json_default``)."""
    text = json.dumps(_nan_to_none(value), indent=indent, default=default)
    return atomic_write_text(path, text)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(item) for item in value]
    return value
