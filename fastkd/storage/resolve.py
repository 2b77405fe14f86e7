"""What a user passes (a local path, an ``s3://`` URL, a ``Location``) as a place, and as
configs keep it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastkd.errors import ConfigError
from fastkd.storage.location import LocalLocation, Location
from fastkd.storage.objects import ObjectLocation
from fastkd.storage.options import StorageOptions, default_options, is_url


def as_location(
    spec: Location | str | os.PathLike[str], storage_options: Any = None
) -> Location:
    """A location from what a user passes: a ``Location`` as it is, a URL, or a local path.

    ``storage_options``: ``--storage-option`` items or a mapping (``StorageOptions.parse``),
    for URLs (default: the command's, ``options.configure``); refused with a local path, where
    they would silently do nothing."""
    if isinstance(spec, Location):
        return spec
    options = StorageOptions.parse(storage_options)
    if is_url(spec):
        return ObjectLocation(str(spec), options if options.values else default_options())
    if options.values:
        raise ConfigError(
            f"--storage-option is for object storage URLs (s3://...), and {spec} is a local path"
        )
    return LocalLocation(spec)


def local_or_url(spec: str | os.PathLike[str]) -> Path | str:
    """A data or store argument as configs keep it: a ``Path``, or a URL string as given (a
    ``Path`` would fold ``s3://b/k`` into ``s3:/b/k``)."""
    if isinstance(spec, Location):
        return spec.path if isinstance(spec, LocalLocation) else str(spec)
    return str(spec) if is_url(spec) else Path(spec)
