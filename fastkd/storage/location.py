"""A place that holds files: a local folder or file, or a key prefix in an object store.

The store (``fastkd.store``) and the tar shards (``fastkd.data.shards``) do a few things with
their files beside what zarr does: read and replace small JSON records, create one only if it is
absent (the writers' claims), list and delete, learn an object's size and version, read byte
ranges. ``Location`` is those operations, for both kinds of place, so each caller has one code
path. Local locations keep the guarantees the store always had (atomic replace, ``O_EXCL``);
object locations use obstore (``docs/design.md`` says why obstore rather than fsspec/s3fs): a
create-if-absent is a conditional PUT (``If-None-Match: *``), transient errors are retried with
backoff by obstore itself, and an error that persists is raised as ``StorageError`` naming the
URL. A location pickles as its URL and settings; clients are made per process (fork-safe).

This module holds the interface and local places; ``objects`` the places in object storage,
``resolve`` the turning of what a user passes into one.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fastkd.files import atomic_write


class ObjectInfo(NamedTuple):
    """What identifies an object's content: any rewrite changes ``version``."""

    size: int
    version: str  # an ETag, or a local file's (mtime, inode, ctime) in ns


class Location(ABC):
    """A file or folder by its place; ``/`` gives a place below it."""

    is_remote: bool

    @abstractmethod
    def __truediv__(self, name: str) -> Location: ...

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def exists(self) -> bool:
        """Whether a file (object) is here."""

    @abstractmethod
    def has_contents(self) -> bool:
        """Whether anything lies below this place (a folder, a key prefix)."""

    @abstractmethod
    def read_bytes(self) -> bytes:
        """The whole file; ``FileNotFoundError`` when there is none."""

    @abstractmethod
    def write_bytes(self, data: bytes) -> None:
        """Replace the file at once: a reader sees the old content or the new, never half."""

    @abstractmethod
    def create(self, data: bytes) -> bool:
        """Write the file only if none is here; False (nothing written) when one is."""

    @abstractmethod
    def read_versioned(self) -> tuple[bytes, str]:
        """The whole file and the version read; ``FileNotFoundError`` when there is none."""

    @abstractmethod
    def take_over(self, version: str, data: bytes) -> bool:
        """Replace the file with ``data`` only if it is still at ``version``: of writers that
        read one stale lock, one wins (object storage: a conditional PUT on the ETag)."""

    @abstractmethod
    def delete(self) -> None:
        """Remove the file; nothing when there is none."""

    @abstractmethod
    def files(self) -> Iterator[tuple[str, int]]:
        """(path relative to here, size) of every file below this place."""

    @abstractmethod
    def info(self) -> ObjectInfo:
        """Size and version of the file; ``FileNotFoundError`` when there is none."""

    @abstractmethod
    def read_ranges(self, starts: Sequence[int], sizes: Sequence[int]) -> list[bytes]:
        """Byte ranges of the file, each whole (remote: in concurrent requests)."""

    @abstractmethod
    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` takes for a group here."""

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def delete_below(self, keep: Callable[[str], bool] = lambda _: False) -> None:
        """Remove every file below this place whose relative path ``keep`` refuses."""
        for relative, _ in list(self.files()):
            if not keep(relative):
                (self / relative).delete()


class LocalLocation(Location):
    """A local (or mounted) path."""

    is_remote = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> LocalLocation:
        return LocalLocation(self.path / name)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalLocation({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalLocation) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_file()

    def has_contents(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def write_bytes(self, data: bytes) -> None:
        atomic_write(self.path, lambda handle: handle.write(data))

    def create(self, data: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return True

    def read_versioned(self) -> tuple[bytes, str]:
        version = self.info().version
        return self.path.read_bytes(), version

    def take_over(self, version: str, data: bytes) -> bool:
        """Locally the check and the replacement are two steps (a rename would change the
        ctime the version holds); one host's pid check makes two breakers of one lock rare."""
        try:
            if self.info().version != version:
                return False
        except FileNotFoundError:
            return False
        self.delete()
        return self.create(data)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    def files(self) -> Iterator[tuple[str, int]]:
        if not self.path.is_dir():
            return
        for file in sorted(self.path.rglob("*")):
            if file.is_file():
                yield file.relative_to(self.path).as_posix(), file.stat().st_size

    def info(self) -> ObjectInfo:
        stat = self.path.stat()
        return ObjectInfo(stat.st_size, f"{stat.st_mtime_ns}-{stat.st_ino}-{stat.st_ctime_ns}")

    def read_ranges(self, starts: Sequence[int], sizes: Sequence[int]) -> list[bytes]:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return [pread_all(fd, size, start) for start, size in zip(starts, sizes, strict=True)]
        finally:
            os.close(fd)

    def zarr_store(self, read_only: bool) -> Any:
        return self.path

    def delete_below(self, keep: Callable[[str], bool] = lambda _: False) -> None:
        super().delete_below(keep)
        folders = sorted((p for p in self.path.rglob("*") if p.is_dir()), reverse=True)
        for folder in folders:  # deepest first: the folders left empty go too
            with contextlib.suppress(OSError):
                folder.rmdir()


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (network file systems may return short reads); fewer only at
    the end of the file."""
    parts = [os.pread(fd, size, offset)]
    got = len(parts[0])
    while parts[-1] and got < size:
        parts.append(os.pread(fd, size - got, offset + got))
        got += len(parts[-1])
    return b"".join(parts) if len(parts) > 1 else parts[0]
