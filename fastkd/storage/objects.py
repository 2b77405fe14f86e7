"""Places in S3-compatible object storage, reached with obstore (``location.Location``'s
operations as requests: a create-if-absent is a conditional PUT, a take-over a PUT conditioned
on the ETag), and the one rule for an object storage failure met anywhere (``storage_failure``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastkd.errors import StorageError
from fastkd.storage.location import Location, ObjectInfo
from fastkd.storage.options import StorageOptions, split_url


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
