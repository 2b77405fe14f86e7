"""Where files live: local paths and object storage (``s3://bucket/key``), behind one interface.

- ``options``: URLs, ``--storage-option KEY=VALUE`` (``StorageOptions``), credentials, retries.
- ``location``: the ``Location`` interface (read, replace, create-if-absent, take over a
  version, list, delete, version and byte ranges of files, zarr's store for a group) and
  ``LocalLocation``.
- ``objects``: ``ObjectLocation`` (obstore) and ``storage_failure``, the one rule for an object
  storage failure met anywhere.
- ``resolve``: ``as_location`` (what a user passes as a place) and ``local_or_url``.
- ``ranges``: byte ranges read in few, concurrent requests conditioned on a version.
- ``clients``: obstore clients, one per process and bucket.
"""

from fastkd.storage.location import LocalLocation, Location, ObjectInfo
from fastkd.storage.objects import ObjectLocation, storage_failure
from fastkd.storage.options import StorageOptions, configure, is_url, split_url
from fastkd.storage.resolve import as_location, local_or_url

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
