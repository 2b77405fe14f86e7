"""A tar shard's image members read by offset: where each sample's image lies, and its bytes.

The index (``fastkd.data.shards``) gives each image member's shard, offset and size; reading one
is then one ``os.pread`` on a descriptor opened for it, with no shared file position, so loader
threads and forked DataLoader workers read side by side (fork-safe: a worker shares nothing).
A member also opens as a read-only file, for PIL to read its header from.

A shard on object storage is read by byte range instead (``fastkd.storage.ranges``): a batch's
members at once (``read_many``: near ones in one request, shards concurrently), every request
conditioned on the ETag the shard had when indexed, so a shard rewritten since is refused
(``ShardChangedError``) rather than read at offsets of its old content. Clients are made per
process (``fastkd.storage.clients``): fork-safe as well.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fastkd.errors import ObjectChangedError, ShardChangedError
from fastkd.storage import ObjectLocation
from fastkd.storage.location import pread_all
from fastkd.storage.ranges import RangeRequest, read_batched, read_span

HEADER_BUFFER = 64 << 10  # what a remote member opened as a file reads at once (an image header)


@dataclass(frozen=True, eq=False)
class ShardMembers:
    """Where each sample's image lies: its shard, the data's offset and size, its member name."""

    shards: tuple[Path | ObjectLocation, ...]
    shard: np.ndarray  # int32 [n]: index into ``shards``
    offset: np.ndarray  # int64 [n]: the member's first data byte in its shard
    size: np.ndarray  # int64 [n]: the member's bytes
    member: tuple[str, ...]  # the image member's name in its shard
    versions: tuple[str | None, ...] = ()  # per shard: the ETag indexed (remote), else None

    @property
    def is_remote(self) -> bool:
        """Whether the shards are on object storage (their readers must not be forked)."""
        return any(isinstance(shard, ObjectLocation) for shard in self.shards)

    def name(self, sample: int) -> str:
        """``shards/train-000003.tar:n01440764_10026.jpg``: what messages call the image."""
        return f"{self.shards[self.shard[sample]]}:{self.member[sample]}"

    def read(self, sample: int) -> bytes:
        """The member's bytes; ``OSError`` if the shard no longer holds them.

        One ``pread`` on a descriptor opened for it: no shared file position, so loader threads
        and forked DataLoader workers read side by side."""
        path, offset, size = self.shards[self.shard[sample]], *self._span(sample)
        if isinstance(path, ObjectLocation):
            (data,) = self.read_many([sample])
            if isinstance(data, OSError):  # a cut member: raised, as a local shard's
                raise data
            return data
        fd = os.open(path, os.O_RDONLY)
        try:
            data = pread_all(fd, size, offset)  # network file systems may return short reads
        finally:
            os.close(fd)
        if len(data) < size:
            raise self._cut(sample)
        return data

    def read_many(self, samples: Sequence[int] | np.ndarray) -> list[bytes | OSError]:
        """Each sample's member bytes, or the ``OSError`` that a local shard gave for it (as
        ``read``). A remote shard's members are read together (``fastkd.storage.ranges``): a
        persistent storage error raises ``StorageError``, a shard rewritten or removed since
        it was indexed ``ShardChangedError``, both naming the shard."""
        samples = [int(s) for s in samples]
        out: list[bytes | OSError] = [b""] * len(samples)
        by_shard: dict[int, list[int]] = {}
        for row, sample in enumerate(samples):
            shard = int(self.shard[sample])
            if isinstance(self.shards[shard], ObjectLocation):
                by_shard.setdefault(shard, []).append(row)
                continue
            try:
                out[row] = self.read(sample)
            except OSError as error:
                out[row] = error
        if not by_shard:
            return out
        requests = [
            RangeRequest(
                self.shards[shard],  # type: ignore[arg-type]
                self._version(shard),
                [int(self.offset[samples[row]]) for row in rows],
                [int(self.size[samples[row]]) for row in rows],
            )
            for shard, rows in by_shard.items()
        ]
        concurrency = requests[0].location.options.concurrency
        with _named_changes():
            got = read_batched(requests, concurrency)
        for rows, datas in zip(by_shard.values(), got, strict=True):
            for row, data in zip(rows, datas, strict=True):
                out[row] = data if len(data) == self.size[samples[row]] else self._cut(samples[row])
        return out

    def open(self, sample: int) -> BinaryIO:
        """The member as a read-only file: PIL reads a header from it as from a file, no more
        (the header sizes of a data set read a few KiB of each image, not all of it; from a
        remote shard one request of ``HEADER_BUFFER`` bytes for most images)."""
        shard = int(self.shard[sample])
        path = self.shards[shard]
        if isinstance(path, ObjectLocation):
            raw = _RemoteMemberFile(path, self._version(shard), *self._span(sample))
            return io.BufferedReader(raw, buffer_size=HEADER_BUFFER)
        return io.BufferedReader(_LocalMemberFile(path, *self._span(sample)))

    def _span(self, sample: int) -> tuple[int, int]:
        return int(self.offset[sample]), int(self.size[sample])

    def _version(self, shard: int) -> str | None:
        return self.versions[shard] if self.versions else None

    def _cut(self, sample: int) -> OSError:
        return OSError(
            f"shard {self.shards[self.shard[sample]]} ends inside member {self.member[sample]} "
            "(it was cut or rewritten since the data set was opened)"
        )


@contextlib.contextmanager
def _named_changes() -> Iterator[None]:
    """A refused conditional read (``ObjectChangedError``) or a removed object as a
    ``ShardChangedError`` that says what to do (a DataLoader worker re-raises it whole)."""
    try:
        yield
    except ObjectChangedError as error:
        raise ShardChangedError(
            f"shard {error.url} changed since its members were indexed (ETag {error.version} "
            "then): its offsets no longer hold; open the data again (it is indexed anew), and "
            "a store dumped from the old shard refuses the new one"
        ) from None
    except FileNotFoundError as error:
        raise ShardChangedError(f"{error} (removed since the data set was indexed)") from None


class _MemberFile(io.RawIOBase):
    """Bytes ``offset`` to ``offset + size`` of a shard as a seekable file, each ``readinto``
    one read at its position (``_read``: a local or a remote shard's)."""

    def __init__(self, offset: int, size: int) -> None:
        super().__init__()
        self._start, self._size, self._position = offset, size, 0

    def _read(self, offset: int, count: int) -> bytes:
        raise NotImplementedError

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        data = self._read(self._start + self._position, count) if count else b""
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position


class _LocalMemberFile(_MemberFile):
    """A local shard's member, read with ``pread`` (no shared position)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__(offset, size)
        self._fd = os.open(path, os.O_RDONLY)

    def _read(self, offset: int, count: int) -> bytes:
        return os.pread(self._fd, count, offset)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _RemoteMemberFile(_MemberFile):
    """A remote shard's member, a ranged read of the indexed version per ``readinto`` (the
    ``BufferedReader`` above asks for ``HEADER_BUFFER`` at a time)."""

    def __init__(self, shard: ObjectLocation, version: str | None, offset: int, size: int) -> None:
        super().__init__(offset, size)
        self._shard, self._version = shard, version

    def _read(self, offset: int, count: int) -> bytes:
        with _named_changes():
            return read_span(self._shard, offset, offset + count, self._version)
