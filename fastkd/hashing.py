"""The one content hash fastkd records: xxh3-64 (xxhash), as a signed int64 for numpy and zarr.

Used for the store's block hashes (``fastkd.store.integrity``) and the images' content hashes
(``fastkd.data``): fast enough (GB/s) to run on every block decoded and every file read.
"""

from __future__ import annotations

import numpy as np
import xxhash

UNRECORDED = 0  # a content hash that was not recorded (a skipped image, an older writer)


def content_hash(data: bytes | memoryview) -> int:
    """xxh3-64 of ``data`` as a signed 64-bit integer."""
    return int(np.uint64(xxhash.xxh3_64_intdigest(data)).view(np.int64))
