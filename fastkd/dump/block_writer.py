"""Block writes in one background thread (``BackgroundWrites``), so that the next block's
inference overlaps the previous block's encoding, hashing and zarr compression.

One thread, fed by a bounded queue: the store's writer (zarr) is used from that thread alone, and
the thread is joined before the caller leaves the ``with``, so before it closes the store. A
write's failure ends the thread and is raised, as itself, in the caller's thread at its next
``check``, ``submit`` or at the end (never a hang on a full queue). A failure of the caller stops
the thread: the blocks already queued are whole and are still written, unless the caller was
interrupted (KeyboardInterrupt, SystemExit, GeneratorExit), when only the block being written
finishes; a block counts once
``write`` has returned (it marks the block last), so nothing partial is ever marked done.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

# Blocks waiting for the writer thread. Each holds its logits in host memory (samples per block
# x views x classes x 4 bytes per model: 32 MiB a model for 8192 views of 1000 classes), beside
# the one being written, the one waiting to be queued and the one being filled (on the device):
# depth + 2 blocks on the host at most. 2 lets a slow write catch up without stalling inference,
# and bounds that memory. 0 writes each block in the caller's thread (no overlap).
DEFAULT_WRITE_QUEUE = 2
THREAD_NAME = "fastkd-block-writer"
POLL_S = 0.05  # how often a caller waiting on the writer looks whether it has died

T = TypeVar("T")
_STOP = object()  # the end of the queue


class BackgroundWrites(Generic[T]):
    """``write(item)`` for each submitted item, in order, in one thread (``depth`` items queued
    at most), or at once in the caller's thread when ``depth`` is 0. Use as a context manager:
    leaving it waits for every queued write, or on an error stops the thread, and joins it."""

    def __init__(self, write: Callable[[T], None], depth: int = DEFAULT_WRITE_QUEUE) -> None:
        if depth < 0:
            raise ValueError(f"the write queue's depth must be >= 0, got {depth}")
        self._write = write
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancel = threading.Event()  # drop what is queued, finish the write in progress
        self._thread = (
            threading.Thread(target=self._run, name=THREAD_NAME, daemon=True) if depth else None
        )

    def __enter__(self) -> BackgroundWrites[T]:
        if self._thread is not None:
            self._thread.start()
        return self

    def submit(self, item: T) -> None:
        """Queue ``item`` (waiting while the queue is full); raise the writer's failure."""
        self.check()
        if self._thread is None:
            self._write(item)
        else:
            self._put(item)

    def check(self) -> None:
        """Raise the exception that ended the writer thread, if one did."""
        if self._error is not None:
            raise self._error

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread is None:
            return
        if error is None:
            stopped = False
            try:
                self._put(_STOP)  # after every queued write
                stopped = True
            finally:  # a Ctrl-C while the queue is full: drop what is queued, still join
                if not stopped:
                    self._cancel.set()
                self._join()
            self.check()
            return
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: out quickly
            self._cancel.set()
        stopped = False
        try:
            self._put(_STOP, raise_failure=False)
            stopped = True
        finally:  # even through a second Ctrl-C: the store must not close under the thread
            if not stopped:
                self._cancel.set()  # no stop queued: the thread ends once the queue is empty
            self._join()
        if self._error is not None and self._error is not error:
            log.error("the block writer stopped too: %s", self._error)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._cancel.is_set():  # cancelled, and no stop will come
                    return
                continue
            if item is _STOP:
                return
            if self._cancel.is_set():
                continue  # dropped: the stop comes after it
            try:
                self._write(item)  # type: ignore[arg-type]
            except BaseException as error:  # raised again in the caller's thread
                self._error = error
                return

    def _put(self, item: object, raise_failure: bool = True) -> None:
        """Put, without waiting for ever on a full queue: a dead writer empties none."""
        assert self._thread is not None
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
        if raise_failure:
            self.check()

    def _join(self) -> None:
        """Join the thread even through Ctrl-C (the caller must not close the store under it):
        an interrupt drops the queued writes, so only the one in progress is waited for."""
        assert self._thread is not None
        interrupted = False
        while self._thread.is_alive():
            try:
                self._thread.join()
            except KeyboardInterrupt:
                self._cancel.set()
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
