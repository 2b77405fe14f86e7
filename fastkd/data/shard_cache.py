"""The on-disk cache of tar shard scans (``fastkd.data.shards``): a second open of an unchanged
shard reads one small file instead of parsing every member header again.

Each command and torchrun rank opens its data anew, and ``tarfile`` parses a header in Python
(ImageNet's scan: two CPU minutes). So each shard's scan is an ``.npz`` in
``$FASTKD_CACHE_DIR/shard-index``, else ``$XDG_CACHE_HOME/fastkd/shard-index``, else
``~/.cache/fastkd/shard-index`` (shards are often on read-only storage), named by the shard's
real path, size, mtime, inode and ctime (``cp -p`` keeps an mtime), or a shard on object storage
by its URL, size and ETag: a rewritten shard is scanned again, and an entry for another ETag is
never used; old entries stay (no eviction). Only clean scans of shards unchanged for ``RECENT_NS`` are
cached; an entry that fails any check is ignored and written again (never trusted); a cache that
cannot be written costs a debug line, never the open.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from fastkd.storage import ObjectLocation

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # of the cached scan's layout; an entry of another is scanned again
RECENT_NS = 2_000_000_000  # a shard changed this recently is not cached (file clocks are coarse)


class ShardScan(NamedTuple):
    """A shard's samples in the order of their images, as the cache holds them (no object a
    sample: loading a cached scan is a few C calls)."""

    keys: list[str]
    names: list[str]  # the image members'
    offsets: np.ndarray  # int64: each image's first data byte in the shard
    sizes: np.ndarray  # int64
    labels: np.ndarray  # int64: the class indexes


def cache_dir() -> Path | None:
    """The folder of cached scans, made; None (and a debug line) where it cannot be."""
    try:
        if os.environ.get("FASTKD_CACHE_DIR"):
            cache = Path(os.environ["FASTKD_CACHE_DIR"]) / "shard-index"
        else:
            base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
            cache = Path(base) / "fastkd" / "shard-index"
        cache.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as error:  # RuntimeError: no home folder to be found
        log.debug("shard indexes not cached: %s", error)
        return None
    return cache


class ShardIdentity(NamedTuple):
    """What a cached scan is valid for: the shard's real path and what any rewrite changes."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, shard: Path) -> ShardIdentity:
        st = os.stat(shard)
        return cls(os.path.realpath(shard), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def cache_file(self, cache: Path) -> Path:
        return _entry(repr(self), cache)


class ObjectIdentity(NamedTuple):
    """What a cached scan of a shard on object storage is valid for: its URL (and endpoint: two
    servers may hold one bucket name), size and ETag, which any rewrite changes."""

    url: str
    endpoint: str
    size: int
    etag: str

    @classmethod
    def of(cls, shard: ObjectLocation) -> ObjectIdentity:
        """From one HEAD request; ``FileNotFoundError`` where there is no such object."""
        info = shard.info()
        return cls(shard.url, shard.options.endpoint() or "", info.size, info.version)

    def cache_file(self, cache: Path) -> Path:
        return _entry(repr(self), cache)


def _entry(identity: str, cache: Path) -> Path:
    """The cache file of a shard's identity (its ``repr``, also stored inside and checked)."""
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()
    return cache / f"{digest[:32]}.npz"


def read_cached(
    cache: Path | None, shard: Path | ShardIdentity | ObjectIdentity
) -> ShardScan | None:
    """The shard's cached scan (a local shard by its path or identity, a remote one by its
    ``ObjectIdentity``); None where there is none, or it is unreadable or fails a check (it is
    scanned and written again: a cache file is never trusted)."""
    if cache is None:
        return None
    try:
        identity = shard if isinstance(shard, tuple) else ShardIdentity.of(shard)
        with np.load(identity.cache_file(cache), allow_pickle=False) as data:
            return _unpack(data, identity)
    except FileNotFoundError:
        return None
    except Exception as error:  # zip, numpy and our checks raise many kinds: none trusted
        log.debug("cached index of shard %s ignored: %s", shard, error)
        return None


def _unpack(data: np.lib.npyio.NpzFile, identity: ShardIdentity | ObjectIdentity) -> ShardScan:
    """The scan ``write_cached`` stored; ``ValueError`` unless whole and for this shard."""
    if int(data["version"]) != CACHE_VERSION or str(data["identity"]) != repr(identity):
        raise ValueError("written by another format version or for another file")
    keys, names = (data[f].tobytes().decode("utf-8", "surrogateescape") for f in ("keys", "names"))
    keys, names = keys.split("\0")[:-1], names.split("\0")[:-1]  # each ends in a NUL
    numbers = [data[field] for field in ShardScan._fields[2:]]
    counts = {len(keys), len(names), *(len(array) for array in numbers)}
    if len(counts) > 1 or any(array.dtype != np.int64 or array.ndim != 1 for array in numbers):
        raise ValueError("its arrays differ in type or length")
    offsets, sizes, labels = numbers
    ends = offsets + sizes
    apart = (offsets[1:] >= ends[:-1]).all() and (offsets >= 0).all() and (sizes >= 0).all()
    inside = apart and (ends <= identity.size).all() and (labels >= 0).all()
    if not inside or len(set(keys)) != len(keys) or not all(map(str.startswith, names, keys)):
        raise ValueError("its members are not those of a scan")
    return ShardScan(keys, names, offsets, sizes, labels)


def write_cached(
    cache: Path, identity: ShardIdentity | ObjectIdentity, scan: ShardScan
) -> str | None:
    """Cache a shard's clean scan; why not, where it could not be (None: cached). Stored as
    arrays (keys and names UTF-8, each ending in a NUL), atomically: a temporary file in the
    folder, renamed, so ranks opening the data at once never read half a file. A local shard
    changed within ``RECENT_NS`` is not cached: a same-size rewrite in one clock tick keeps its
    name (an ETag has no such tick)."""
    recent = isinstance(identity, ShardIdentity) and time.time_ns() - identity.ctime_ns < RECENT_NS
    if recent:
        return None
    blobs = {
        field: "".join(f"{text}\0" for text in texts).encode("utf-8", "surrogateescape")
        for field, texts in zip(ShardScan._fields[:2], scan[:2], strict=True)
    }
    if blobs["names"].count(b"\0") != len(scan.names):
        return "a member name holds a NUL byte"  # (a NUL ends a name in a tar header)
    path = identity.cache_file(cache)
    try:
        handle, temporary = tempfile.mkstemp(dir=cache, prefix=f"{path.stem}.", suffix=".tmp")
    except OSError as error:
        return str(error)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                version=np.int64(CACHE_VERSION),
                identity=np.str_(repr(identity)),
                **{field: np.frombuffer(blob, dtype=np.uint8) for field, blob in blobs.items()},
                **dict(zip(ShardScan._fields[2:], scan[2:], strict=True)),
            )
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return str(error)
    return None
