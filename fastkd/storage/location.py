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
"""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from fastkd.errors import ConfigError, StorageError
from fastkd.files import atomic_write
from fastkd.storage.options import StorageOptions, default_options, is_url, split_url


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


class ObjectLocation(Location):
    """A key (or key prefix) in an S3-compatible bucket, reached with obstore."""

    is_remote = True

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        self.scheme, self.bucket, self.key = split_url(url)
        self.options = options or StorageOptions()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    def __truediv__(self, name: str) -> ObjectLocation:
        key = f"{self.key}/{name.strip('/')}" if self.key else name.strip("/")
        return ObjectLocation(f"{self.scheme}://{self.bucket}/{key}", self.options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectLocation({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectLocation) and (other.url, other.options) == (
            self.url,
            self.options,
        )

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self) -> tuple[Any, ...]:
        return ObjectLocation, (self.url, self.options)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def client(self) -> Any:
        from fastkd.storage.clients import bucket_client

        return bucket_client(self.scheme, self.bucket, self.options)

    def call(self, what: str, request: Callable[[], Any]) -> Any:
        """``request()`` (obstore calls on this object), obstore's errors as
        ``FileNotFoundError`` or ``StorageError`` naming the URL (obstore has already retried
        the transient ones): ``fastkd.storage.ranges`` reads through it too."""
        import obstore.exceptions as oe

        try:
            return request()
        except (oe.NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{self.url}: no such object") from None
        except (oe.BaseError, OSError, RuntimeError) as error:
            raise StorageError(
                f"{self.url}: {what} failed (transient errors are retried, up to "
                f"{self.options.retry_config()['max_retries']} times a request): "
                f"{_first_line(error)}"
            ) from error

    def exists(self) -> bool:
        try:
            self.info()
        except FileNotFoundError:
            return False
        return True

    def has_contents(self) -> bool:
        import obstore

        def first() -> bool:
            stream = obstore.list(self.client, prefix=self.key + "/" if self.key else None, chunk_size=1)
            return any(len(batch) for batch in stream)

        return self.call("list", first)

    def read_bytes(self) -> bytes:
        import obstore

        return self.call("read", lambda: obstore.get(self.client, self.key).bytes().to_bytes())

    def write_bytes(self, data: bytes) -> None:
        import obstore

        self.call("write", lambda: obstore.put(self.client, self.key, data))

    def create(self, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        def put() -> bool:
            try:
                obstore.put(self.client, self.key, data, mode="create")
            except oe.AlreadyExistsError:
                return False
            return True

        return self.call("create-if-absent", put)

    def read_versioned(self) -> tuple[bytes, str]:
        import obstore

        def get() -> tuple[bytes, str]:
            result = obstore.get(self.client, self.key)
            return result.bytes().to_bytes(), str(result.meta.get("e_tag") or "")

        return self.call("read", get)

    def take_over(self, version: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as oe

        def put() -> bool:
            try:
                obstore.put(self.client, self.key, data, mode={"e_tag": version})
            except (oe.PreconditionError, oe.NotFoundError, FileNotFoundError):
                return False
            return True

        return self.call("conditional replace", put)

    def delete(self) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self.call("delete", lambda: obstore.delete(self.client, self.key))

    def files(self) -> Iterator[tuple[str, int]]:
        import obstore

        prefix = self.key + "/" if self.key else ""

        def listing() -> list[tuple[str, int]]:
            out = []
            for batch in obstore.list(self.client, prefix=prefix or None):
                out += [(m["path"][len(prefix):], int(m["size"])) for m in batch]
            return sorted(out)

        yield from self.call("list", listing)

    def info(self) -> ObjectInfo:
        import obstore

        meta = self.call("head", lambda: obstore.head(self.client, self.key))
        return ObjectInfo(int(meta["size"]), str(meta.get("e_tag") or meta.get("version") or ""))

    def read_ranges(self, starts: Sequence[int], sizes: Sequence[int]) -> list[bytes]:
        from fastkd.storage.ranges import RangeRequest, read_batched

        request = RangeRequest(self, None, starts, sizes)  # whatever version is there
        return read_batched([request], self.options.concurrency)[0]

    def delete_below(self, keep: Callable[[str], bool] = lambda _: False) -> None:
        import obstore

        prefix = f"{self.key}/" if self.key else ""
        doomed = [prefix + rel for rel, _ in self.files() if not keep(rel)]
        for start in range(0, len(doomed), 1000):  # one bulk request per 1000 keys
            batch = doomed[start : start + 1000]
            self.call("bulk delete", lambda batch=batch: obstore.delete(self.client, batch))

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import ObjectStore

        from fastkd.storage.clients import prefixed_client

        client = prefixed_client(self.scheme, self.bucket, self.key, self.options)
        return ObjectStore(client, read_only=read_only)


def storage_failure(error: BaseException) -> StorageError | None:
    """The object storage failure behind ``error`` (an obstore error that zarr passed on, as it
    does, or a ``StorageError``), as a ``StorageError`` naming the request; None for any other
    error. A missing object is no failure of the storage: None too. So a store's reader never
    takes a server that stopped answering for a damaged block."""
    from fastkd.errors import find_cause

    found = find_cause(error, StorageError)
    if found is not None:
        return found  # type: ignore[return-value]
    exceptions = sys.modules.get("obstore.exceptions")  # never loaded: no object storage used
    if exceptions is None:
        return None
    found = find_cause(error, exceptions.BaseError)
    if found is None or isinstance(found, exceptions.NotFoundError | FileNotFoundError):
        return None
    failure = StorageError(
        f"object storage failed (transient errors are retried): {_first_line(found)}"
    )
    failure.__cause__ = found
    return failure


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


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
