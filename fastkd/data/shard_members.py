"""A tar shard's image members read by offset: where each sample's image lies, and its bytes.

The index (``fastkd.data.shards``) gives each image member's shard, offset and size; reading one
is then one ``os.pread`` on a descriptor opened for it, with no shared file position, so loader
threads and forked DataLoader workers read side by side (fork-safe: a worker shares nothing).
A member also opens as a read-only file, for PIL to read its header from.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True, eq=False)
class ShardMembers:
    """Where each sample's image lies: its shard, the data's offset and size, its member name."""

    shards: tuple[Path, ...]
    shard: np.ndarray  # int32 [n]: index into ``shards``
    offset: np.ndarray  # int64 [n]: the member's first data byte in its shard
    size: np.ndarray  # int64 [n]: the member's bytes
    member: tuple[str, ...]  # the image member's name in its shard

    def name(self, sample: int) -> str:
        """``shards/train-000003.tar:n01440764_10026.jpg``: what messages call the image."""
        return f"{self.shards[self.shard[sample]]}:{self.member[sample]}"

    def read(self, sample: int) -> bytes:
        """The member's bytes; ``OSError`` if the shard no longer holds them.

        One ``pread`` on a descriptor opened for it: no shared file position, so loader threads
        and forked DataLoader workers read side by side."""
        path, offset, size = self.shards[self.shard[sample]], *self._span(sample)
        fd = os.open(path, os.O_RDONLY)
        try:
            parts = [os.pread(fd, size, offset)]
            got = len(parts[0])
            while parts[-1] and got < size:  # network file systems may return short reads
                parts.append(os.pread(fd, size - got, offset + got))
                got += len(parts[-1])
        finally:
            os.close(fd)
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        if len(data) < size:
            raise OSError(
                f"shard {path} ends inside member {self.member[sample]} (it was cut or rewritten "
                "since the data set was opened)"
            )
        return data

    def open(self, sample: int) -> BinaryIO:
        """The member as a read-only file: PIL reads a header from it as from a file, no more
        (the header sizes of a data set read a few KiB of each image, not all of it)."""
        return io.BufferedReader(_MemberFile(self.shards[self.shard[sample]], *self._span(sample)))

    def _span(self, sample: int) -> tuple[int, int]:
        return int(self.offset[sample]), int(self.size[sample])


class _MemberFile(io.RawIOBase):
    """Bytes ``offset`` to ``offset + size`` of a shard, read with ``pread`` (no shared position)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._start, self._size, self._position = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        data = os.pread(self._fd, count, self._start + self._position) if count else b""
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

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
