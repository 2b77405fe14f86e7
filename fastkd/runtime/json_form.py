"""The JSON form of what fastkd records (configs, manifests, reports): one rule for the values
JSON lacks (paths, enums, numpy), without torch or numpy imported, so the store can use it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any


def json_default(value: Any) -> Any:
    """JSON form of the non-JSON values fastkd records: paths, enums, numpy scalars and arrays."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if type(value).__module__ == "numpy":
        return value.tolist()  # numpy scalars and arrays (numpy imported only where they exist)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def plain(value: Any) -> Any:
    """JSON-normal form (tuples become lists, paths strings, numpy values Python numbers), so
    configs compare equal whether they were built here or read back from a file."""
    return json.loads(json.dumps(value, default=json_default))
