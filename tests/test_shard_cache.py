"""The cache of tar shard scans (fastkd.data.shard_cache): a second open reads it instead of
parsing, a rewritten shard is scanned again, a bad entry is never trusted, an unwritable cache
costs a debug line, and torchrun's ranks on a node share its cores for the scan."""

from __future__ import annotations

import errno
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from test_shards import (
    PATTERN,
    SHARDS,
    _assert_same_index,
    _fresh_cache,
    _rewrite_member,
    write_shards,
)

import fastkd.data.shard_cache
import fastkd.data.shards
from fastkd.data import ImageDataset, open_dataset

pytest_plugins = ("digits_pool",)


@pytest.fixture(scope="module")
def shards(digits_small: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(digits_small, tmp_path_factory.mktemp("shards"))


def _no_parsing(shard: Path) -> None:
    raise AssertionError(f"shard {shard} parsed, not read from the cache")


def _no_processes(*args: object, **kwargs: object) -> None:
    raise AssertionError("a process pool started")


def test_a_second_open_reads_the_cache(
    shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _fresh_cache(monkeypatch, tmp_path)
    scanned = open_dataset(shards)
    assert len(list(cache.glob("*.npz"))) == SHARDS and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(fastkd.data.shards, "_scan_shard", _no_parsing)
    _assert_same_index(open_dataset(shards), scanned)
    # a shard named another way (its folder through a link) is the same file: the same entry
    link = tmp_path / "link"
    link.symlink_to(Path(shards).parent)
    linked = open_dataset(link / PATTERN)
    assert linked.keys == scanned.keys and linked.members.member == scanned.members.member


def test_a_rewritten_shard_is_scanned_again(
    digits_small: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = write_shards(digits_small, tmp_path / "shards")
    shard = Path(data).parent / "digits-000001.tar"
    cache = tmp_path / "cache" / "shard-index"
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(cache.parent))

    def next_label(cls: bytes) -> bytes:
        return str((int(cls) + 1) % 10).encode()

    def relabelled(before: ImageDataset) -> ImageDataset:
        """The data after its shard 1's 2nd sample's .cls (its member 3) is rewritten at its size
        with the next class: that sample alone has it, read from the shard."""
        _rewrite_member(data, 1, 3, next_label)
        times = os.stat(shard)  # a second later, as a rewrite at a later clock tick is
        os.utime(shard, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
        after = open_dataset(data)
        sample = before.members.shard.tolist().index(1) + 1
        assert np.flatnonzero(after.labels != before.labels).tolist() == [sample]
        assert after.labels[sample] == (before.labels[sample] + 1) % 10
        return after

    # Shards written a moment ago are not cached: a rewrite in the file system's clock tick may
    # keep the size, mtime, ctime and inode (a .cls rewritten at its size, in place).
    opened = open_dataset(data)
    assert not list(cache.glob("*.npz"))
    _rewrite_member(data, 1, 3, next_label)
    assert (open_dataset(data).labels != opened.labels).sum() == 1

    monkeypatch.setattr(fastkd.data.shard_cache, "RECENT_NS", 0)  # from here cached however recent
    opened = relabelled(open_dataset(data))
    assert len(list(cache.glob("*.npz"))) == SHARDS + 1  # the rewritten shard's old entry stays
    # an image grown by 20000 bytes: its size, the shard's and its later members' offsets change
    member = _rewrite_member(data, 1, 2, lambda png: png + b"\0" * 20000).rpartition(":")[2]
    grown = open_dataset(data)
    index = grown.members.member.index(member)
    assert grown.members.size[index] == opened.members.size[index] + 20000
    in_shard = np.flatnonzero(grown.members.shard == 1)
    later = in_shard[in_shard > index]
    assert len(later) and (grown.members.offset[later] > opened.members.offset[later]).all()
    np.testing.assert_array_equal(grown.labels, opened.labels)
    monkeypatch.setattr(fastkd.data.shards, "_scan_shard", _no_parsing)
    _assert_same_index(open_dataset(data), grown)


def test_a_bad_cache_file_is_ignored_and_written_again(
    shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _fresh_cache(monkeypatch, tmp_path)
    scanned = open_dataset(shards)
    shard = scanned.members.shards[1]
    entry = fastkd.data.shard_cache.ShardIdentity.of(shard).cache_file(cache)
    whole = entry.read_bytes()

    def edited(**changes: object) -> bytes:
        """The entry with arrays changed: a scan of other labels, were it trusted."""
        with np.load(io.BytesIO(whole)) as data:
            arrays = {name: data[name] for name in data.files}
        out = io.BytesIO()
        np.savez(out, **{**arrays, "labels": arrays["labels"] + 1, **changes})
        return out.getvalue()

    other = repr(fastkd.data.shard_cache.ShardIdentity.of(scanned.members.shards[0]))
    bad = {
        "cut": whole[: len(whole) // 2],
        "empty": b"",
        "not a zip": b"\0" * 512,
        "another version": edited(version=np.int64(99)),
        "another shard's": edited(identity=np.str_(other)),
        "a member past the end": edited(offsets=np.full(len(scanned) // SHARDS, 1 << 40)),
        "one label short": edited(labels=np.zeros(3, dtype=np.int64)),
        "labels as floats": edited(labels=np.zeros(len(scanned) // SHARDS)),
    }
    assert edited() != whole  # as written, other labels: were it trusted, they would show
    for what, content in bad.items():
        entry.write_bytes(content)
        _assert_same_index(open_dataset(shards), scanned)
        assert entry.read_bytes() != content, what  # written again, whole
    monkeypatch.setattr(fastkd.data.shards, "_scan_shard", _no_parsing)
    _assert_same_index(open_dataset(shards), scanned)


def test_an_unwritable_cache_costs_a_debug_line(
    shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scanned = open_dataset(shards)
    caplog.set_level(logging.DEBUG, logger="fastkd.data")
    (tmp_path / "file").write_text("")
    _fresh_cache(monkeypatch, tmp_path / "file" / "cache")  # under a file: cannot be made
    _assert_same_index(open_dataset(shards), scanned)
    assert [r.getMessage()[:26] for r in caplog.records] == ["shard indexes not cached: "]

    caplog.clear()  # a folder that takes no file (a full disk): one line for all the shards
    cache = _fresh_cache(monkeypatch, tmp_path / "full")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fastkd.data.shard_cache.tempfile, "mkstemp", full)
    _assert_same_index(open_dataset(shards), scanned)
    assert [r.getMessage() for r in caplog.records] == [
        f"{SHARDS} shard index(es) not cached in {cache}: [Errno 28] No space left on device"
    ]
    monkeypatch.undo()

    caplog.clear()  # written, but not renamed: the temporary file is removed
    cache = _fresh_cache(monkeypatch, tmp_path / "no-rename")
    monkeypatch.setattr(fastkd.data.shard_cache.os, "replace", full)
    _assert_same_index(open_dataset(shards), scanned)
    assert len(caplog.records) == 1 and not list(cache.iterdir())


def test_the_cache_folder_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    usable = fastkd.data.shard_cache.cache_dir
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(tmp_path / "fastkd"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert usable() == tmp_path / "fastkd" / "shard-index"
    monkeypatch.delenv("FASTKD_CACHE_DIR")
    assert usable() == tmp_path / "xdg" / "fastkd" / "shard-index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert usable() == tmp_path / "home" / ".cache" / "fastkd" / "shard-index"
    assert usable().is_dir()


def test_torchrun_ranks_share_the_cores(
    shards: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each of a node's LOCAL_WORLD_SIZE ranks opens the data at once: they share its cores."""
    scanned = open_dataset(shards)
    monkeypatch.setattr(fastkd.data.shards.os, "sched_getaffinity", lambda _: set(range(16)))
    cores = fastkd.data.shards._scan_cores
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores() == 16
    for ranks, share in [("1", 16), ("4", 4), ("8", 2), ("3", 5), ("32", 1), ("0", 16), ("x", 16)]:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert cores() == share, ranks

    # a core each: a large shard set is scanned in threads, no processes started
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    _fresh_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(fastkd.data.shards, "_PROCESS_BYTES", 0)
    monkeypatch.setattr(fastkd.data.shards, "ProcessPoolExecutor", _no_processes)
    _assert_same_index(open_dataset(shards), scanned)
