"""Who writes what: the creation lock, the writers' part claims, and a rank's part ``i/n``.

Ranks fill one store together, each its part ``i/n`` of the blocks (block ``b`` belongs to part
``b % n``). Two dumps that do not know of each other must not write one block, and one that died
must not lock the store for good; so each writer records itself (host, pid, run id, part,
heartbeat) in ``STORE/.fastkd/``: a lock file while it creates or checks the store, and a claim
while it writes. A live overlapping claim refuses a new writer; a dead one (stale heartbeat, or a
pid gone on this host) is removed. Files and processes, no arrays: the writer is its only user.

The lock is taken by creating its file only if none exists: ``O_EXCL`` on a local disk, a
conditional PUT (``If-None-Match: *``) on object storage, where there is no lock file to share
(``fastkd.storage.Location.create``). Both are atomic, so ranks on different hosts sharing only
a bucket still create a store once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fastkd.errors import ConfigError, StoreBusyError
from fastkd.storage import Location

HEARTBEAT_S = 30.0  # a writer refreshes its claim this often
CLAIM_STALE_S = 300.0  # a claim (or the creation lock) not refreshed for this long is dead
LOCK_WAIT_S = 900.0  # how long a rank waits for another to finish creating the store


def resolve_part(spec: str | None = None) -> tuple[int, int]:
    """``"i/n"``, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if spec:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match:
            raise ConfigError(f"--part must look like i/n (e.g. 0/4), got {spec!r}")
        part = int(match[1]), int(match[2])
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        part = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        part = (0, 1)
    check_part(part)
    return part


def check_part(part: tuple[int, int]) -> None:
    """Refuse a part ``i/n`` that is not one of ``n`` parts."""
    i, n = part
    if not 0 <= i < n:
        raise ConfigError(f"part {i}/{n}: need 0 <= i < n")


def parts_overlap(a: tuple[int, int], b: tuple[int, int], num_blocks: int) -> bool:
    """Whether parts ``i/n`` and ``j/m`` share a block (block b belongs to i/n when b % n == i)."""
    (i, n), (j, m) = a, b
    return any(block % m == j for block in range(i, num_blocks, n))


@dataclass
class Holder:
    """A writer process, as recorded in the creation lock and in part claims."""

    host: str
    pid: int
    run_id: str
    part: tuple[int, int]
    started: float
    heartbeat: float

    @classmethod
    def me(cls, run_id: str, part: tuple[int, int]) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), run_id, part, now, now)

    @classmethod
    def load(cls, path: Location) -> Holder | None:
        """The holder in a lock or claim file; None when it vanished or is still being written."""
        try:
            return cls.parse(path.read_bytes())
        except FileNotFoundError:
            return None

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock or claim holds, None when it cannot be read (half written).

        Files written before the rename of ``shard`` to ``part`` are read too."""
        try:
            values = json.loads(raw)
            values["part"] = tuple(values.pop("part") if "part" in values else values.pop("shard"))
            return cls(**values)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def is_live(self) -> bool:
        """Dead when its heartbeat is stale, or when it ran on this host and its pid is gone."""
        if time.time() - self.heartbeat > CLAIM_STALE_S:
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        i, n = self.part
        age = time.time() - self.heartbeat
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, part {i}/{n}, heartbeat {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def creation_lock(store: Location, meta: Location, holder: Holder) -> Iterator[None]:
    """Exclusive lock file while a store is created or checked; others wait, a dead holder's lock
    is broken."""
    lock = meta / "lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while not lock.create(holder.to_json()):
        try:
            raw, version = lock.read_versioned()
        except FileNotFoundError:
            continue  # released meanwhile: create it again
        other = Holder.parse(raw)
        if other is not None and not other.is_live():
            if lock.take_over(version, holder.to_json()):
                break  # of the writers that found it dead, this one took it
            continue
        if time.monotonic() > deadline:
            who = other.describe() if other else "a writer"
            raise StoreBusyError(
                f"store {store} stayed locked by {who} for {LOCK_WAIT_S:.0f} s; "
                f"if no fastkd process is creating it, delete {lock}"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        lock.delete()


def claim_file(meta: Location, run_id: str) -> Location:
    """The claim of the writer ``run_id``."""
    return meta / "claims" / f"{run_id}.json"


def claims(meta: Location) -> list[Holder]:
    """The writers holding claims (live or not) on the store of ``meta``."""
    holders = []
    for name, _ in (meta / "claims").files():
        if "/" in name or not name.endswith(".json") or name.startswith("."):
            continue  # an atomic write's temp file, or something not ours
        holder = Holder.load(meta / "claims" / name)
        if holder is not None:
            holders.append(holder)
    return holders


def claim_part(store: Location, meta: Location, me: Holder, num_blocks: int, force: bool) -> None:
    """Record this writer's claim; refuse when a live writer holds an overlapping part."""
    for holder in claims(meta):
        file = claim_file(meta, holder.run_id)
        if not holder.is_live():
            file.delete()
        elif parts_overlap(holder.part, me.part, num_blocks):
            if not force:
                i, n = me.part
                raise StoreBusyError(
                    f"store {store}: part {i}/{n} overlaps the live claim of "
                    f"{holder.describe()}. Two uncoordinated dumps into one store are refused: give "
                    f"each rank its own --part i/n. If that dump is dead, wait {CLAIM_STALE_S:.0f} s "
                    f"after its last heartbeat or delete {file}."
                )
            file.delete()
    claim_file(meta, me.run_id).write_bytes(me.to_json())
