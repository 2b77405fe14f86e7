"""Where files live: local paths and object storage (``s3://bucket/key``), behind one interface.

- ``options``: URLs, ``--storage-option KEY=VALUE`` (``StorageOptions``), credentials, retries.
- ``location``: ``Location`` (``LocalLocation``, ``ObjectLocation``): read, replace,
  create-if-absent, list, delete, version and byte ranges of files, and zarr's store for a group;
  ``as_location`` turns what a user passes into one.
- ``clients``: obstore clients, one per process and bucket.
"""

from fastkd.storage.location import (
    LocalLocation,
    Location,
    ObjectInfo,
    ObjectLocation,
    as_location,
    local_or_url,
    storage_failure,
)
from fastkd.storage.options import StorageOptions, configure, is_url, split_url

__all__ = [
    "LocalLocation",
    "Location",
    "ObjectInfo",
    "ObjectLocation",
    "StorageOptions",
    "as_location",
    "configure",
    "is_url",
    "local_or_url",
    "split_url",
    "storage_failure",
]
