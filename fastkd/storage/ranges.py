"""Byte ranges of objects read as a remote store wants them: in few, large, concurrent requests,
each conditioned on the version the offsets were taken from.

A loader's batch reads many members of a few tar shards, and a shard's index is a walk from
header to header; one request a member would leave both latency-bound. So a batch's ranges of
one object that lie close together (``GAP``) are read as one span (up to ``MAX_SPAN``), the
spans of all objects run at once in a thread pool (``StorageOptions.concurrency``), and a walk
reads its object through a window of ``WINDOW`` bytes (``ObjectReader``). Every request is a GET
with ``If-Match`` on the object's version (ETag): an object rewritten since is refused
(``ObjectChangedError``), never read at offsets of its old content. obstore retries transient
errors (5xx, throttling, timeouts, dropped connections) with backoff; one that persists is a
``StorageError`` naming the URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from fastkd.errors import ObjectChangedError, StorageError
from fastkd.storage.objects import ObjectLocation

GAP = 256 << 10  # ranges this close are one request: the bytes between cost less than a request
MAX_SPAN = 16 << 20  # the most one request of a batch reads
WINDOW = 8 << 20  # what ``ObjectReader`` reads at once: a shard's headers, about 70 a request


class RangeRequest(NamedTuple):
    """Ranges of one version of an object (``version``: its ETag; None: whatever is there)."""

    location: ObjectLocation
    version: str | None
    starts: Sequence[int]
    sizes: Sequence[int]


def read_span(location: ObjectLocation, start: int, end: int, version: str | None) -> bytes:
    """Bytes ``start`` to ``end`` of the object, of ``version`` only (``ObjectChangedError``)."""
    import obstore
    import obstore.exceptions as oe

    if end <= start:
        return b""
    options: dict[str, Any] = {"range": (start, end)}
    if version:
        options["if_match"] = version

    def get() -> bytes:
        return bytes(obstore.get(location.client, location.key, options=options).bytes())

    try:
        return location.call("ranged read", get)
    except StorageError as error:
        if isinstance(error.__cause__, oe.PreconditionError):
            raise ObjectChangedError(location.url, version) from None
        raise


def spans(
    starts: Sequence[int], sizes: Sequence[int], gap: int = GAP, max_span: int = MAX_SPAN
) -> list[tuple[int, int, list[int]]]:
    """(start, end, indexes of the ranges inside) of the requests that read the ranges."""
    out: list[tuple[int, int, list[int]]] = []
    for index in sorted(range(len(starts)), key=lambda i: int(starts[i])):
        start, end = int(starts[index]), int(starts[index]) + int(sizes[index])
        if out and start - out[-1][1] <= gap and max(end, out[-1][1]) - out[-1][0] <= max_span:
            first, last, inside = out[-1]
            out[-1] = (first, max(end, last), [*inside, index])
        else:
            out.append((start, end, [index]))
    return out


def read_batched(requests: Sequence[RangeRequest], concurrency: int) -> list[list[bytes]]:
    """Each request's ranges, in its order: the spans (``spans``) of all requests at once, up to
    ``concurrency`` in flight. A range past the object's end comes back short."""
    jobs = [(n, span) for n, request in enumerate(requests) for span in spans(*request[2:])]

    def fetch(job: tuple[int, tuple[int, int, list[int]]]) -> bytes:
        request = requests[job[0]]
        return read_span(request.location, job[1][0], job[1][1], request.version)

    if len(jobs) <= 1:
        got = [fetch(job) for job in jobs]
    else:
        with ThreadPoolExecutor(min(concurrency, len(jobs))) as pool:
            got = list(pool.map(fetch, jobs))
    out: list[list[bytes]] = [[b""] * len(request.starts) for request in requests]
    for (n, (first, _, inside)), data in zip(jobs, got, strict=True):
        view = memoryview(data)
        for index in inside:
            offset = int(requests[n].starts[index]) - first
            out[n][index] = view[offset : offset + int(requests[n].sizes[index])].tobytes()
    return out


class ObjectReader:
    """One version of an object as a read-only, seekable file (what ``tarfile`` walks): reads
    are served from a window of ``window`` bytes read in one request, so a walk from header to
    header costs a request per window, not per header, and skips members larger than one."""

    mode = "rb"

    def __init__(
        self, location: ObjectLocation, size: int, version: str | None, window: int = WINDOW
    ) -> None:
        self.location, self.size, self.version, self.window = location, size, version, window
        self.name = location.url
        self._position = self._start = 0
        self._data = b""

    def __enter__(self) -> ObjectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._data = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self.size)[whence]
        if base + offset < 0:
            raise OSError(f"{self.name}: negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def read(self, count: int | None = -1) -> bytes:
        rest = max(0, self.size - self._position)
        count = rest if count is None or count < 0 else min(count, rest)
        if count == 0:
            return b""
        start, end = self._position, self._position + count
        if not self._start <= start <= end <= self._start + len(self._data):
            last = min(self.size, max(end, start + self.window))
            self._data, self._start = read_span(self.location, start, last, self.version), start
        data = self._data[start - self._start : end - self._start]
        self._position += len(data)
        return data
