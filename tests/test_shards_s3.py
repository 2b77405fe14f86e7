"""Tar shards on object storage (a real S3 server: moto's on 127.0.0.1, tests/s3_server.py):
indexed as the same shards on disk, members read by byte range bit for bit (one at a time and a
batch at once), the index cached by ETag, a rewritten shard indexed anew and refused by a data
set that indexed the old one, transient faults retried and persistent ones named."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from file_edits import same_size_other_png
from test_dump import run_cli
from test_shards import (
    PATTERN,
    SHARDS,
    _dump_args,
    _first_per_class,
    _images,
    _load,
    _rewrite_member,
    _views,
    assert_same_members,
    write_shards,
)

import fastkd.data.shards
import fastkd.storage
from fastkd.data import DatasetError, ImageDataset, open_dataset
from fastkd.errors import ShardChangedError, StorageError
from fastkd.storage import ObjectLocation
from fastkd.storage.ranges import spans

pytest_plugins = ("digits_pool",)

FAST_RETRIES = ["init_backoff=0.01", "max_backoff=0.05"]


@pytest.fixture(scope="module")
def local_shards(digits_small: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_shards(digits_small, tmp_path_factory.mktemp("shards"))


def _put_shards(server, bucket: str, pattern: str, prefix: str) -> str:
    """The local shards of ``pattern`` uploaded under ``prefix``: their URL pattern."""
    client = server.client()
    for shard in sorted(Path(pattern).parent.glob("*.tar")):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{shard.name}", Body=shard.read_bytes())
    return f"s3://{bucket}/{prefix}/{PATTERN}"


@pytest.fixture
def remote(s3, local_shards: str) -> str:
    """The local shards uploaded to a fresh bucket: their URL pattern (retries kept short)."""
    server, bucket = s3
    fastkd.storage.configure(FAST_RETRIES)
    yield _put_shards(server, bucket, local_shards, "data")
    fastkd.storage.configure(None)


def _upload(server, url: str, data: bytes) -> None:
    """Put ``data`` at ``url`` behind fastkd's back (straight to moto)."""
    location = ObjectLocation(url)
    server.client().put_object(Bucket=location.bucket, Key=location.key, Body=data)


def _assert_same_index(remote: ImageDataset, local: ImageDataset) -> None:
    assert [s.name for s in remote.members.shards] == [s.name for s in local.members.shards]
    assert_same_members(remote, local)
    assert remote.fingerprint() == local.fingerprint()


def test_remote_shards_index_and_read_as_local(s3, remote: str, local_shards: str) -> None:
    server, _ = s3
    local = open_dataset(local_shards)
    before = server.faults.requests
    sharded = open_dataset(remote)
    assert server.faults.requests - before == 2 * SHARDS  # a HEAD and one window per shard
    _assert_same_index(sharded, local)
    assert all(isinstance(s, ObjectLocation) for s in sharded.members.shards)
    assert all(v and v.startswith('"') for v in sharded.members.versions)  # their ETags
    assert sharded.name(0) == f"{remote.split('{')[0]}000000.tar:{local.members.member[0]}"

    everything = np.arange(len(local))[::-1]  # all shards, out of order
    before = server.faults.requests
    got = sharded.read_many(everything)
    assert server.faults.requests - before == SHARDS  # near members: one request a shard
    assert got == [local.read_bytes(int(s)) for s in everything]
    assert sharded.read_bytes(31) == local.read_bytes(31)
    np.testing.assert_array_equal(sharded.sizes, local.sizes)  # headers through open()


def test_loader_in_workers_reads_remote_as_local(remote: str, local_shards: str) -> None:
    """torch backend, DataLoader workers (forked: each makes its own client), bit for bit."""
    local, sharded = open_dataset(local_shards), open_dataset(remote)
    items = _views(local)
    want = _load(local, items, "torch", batch_size=16)
    got = _load(sharded, items, "torch", batch_size=16, num_workers=2)
    assert torch.equal(_images(got), _images(want))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.file_hashes, b.file_hashes)


def test_a_second_open_reads_the_cache(s3, remote: str, monkeypatch) -> None:
    server, _ = s3
    first = open_dataset(remote)

    def no_parsing(*args: object) -> None:
        raise AssertionError("parsed, not read from the cache")

    monkeypatch.setattr(fastkd.data.shards, "_scan_shard", no_parsing)
    before = server.faults.requests
    _assert_same_index(open_dataset(remote), first)
    assert server.faults.requests - before == SHARDS  # a HEAD each: the ETag names the entry


def test_a_rewritten_shard_is_indexed_anew_and_refused_by_the_old_index(
    s3, remote: str, local_shards: str
) -> None:
    server, _ = s3
    old = open_dataset(remote)
    in_second = np.flatnonzero(old.members.shard == 1)
    url = str(old.members.shards[1])
    with tarfile.open(Path(local_shards).parent / "digits-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][2:]  # one less
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    _upload(server, url, out.getvalue())

    for read in (lambda: old.read_bytes(int(in_second[-1])), lambda: old.read_many(in_second)):
        with pytest.raises(ShardChangedError, match=rf"shard {url} changed since .* indexed"):
            read()
    with pytest.raises(ShardChangedError, match=url):
        old.sizes  # noqa: B018 (headers are read by range too)
    assert old.read_bytes(0) == open_dataset(local_shards).read_bytes(0)  # others unchanged

    new = open_dataset(remote)  # the cache entry of the old ETag is not used
    assert len(new) == len(old) - 1 and old.keys[int(in_second[0])] not in new.keys
    assert new.members.versions[1] != old.members.versions[1]
    assert new.fingerprint() != old.fingerprint()  # what a store made from the old refuses


def test_transient_faults_are_retried(s3, remote: str, local_shards: str) -> None:
    server, _ = s3
    local = open_dataset(local_shards)
    injected = server.faults.injected  # counted over the session
    server.faults.fail(2, 503, method="HEAD")
    server.faults.fail(2, 503, method="GET")
    server.faults.fail(1, "drop", method="GET")
    _assert_same_index(open_dataset(remote), local)
    assert server.faults.injected - injected == 5
    sharded = open_dataset(remote)
    server.faults.fail(2, 500, method="GET")
    server.faults.fail(2, "drop", method="GET")
    samples = np.arange(len(local))
    assert sharded.read_many(samples) == local.read_many(samples)
    assert server.faults.injected - injected == 9


def test_persistent_faults_name_the_shard(s3, remote: str) -> None:
    server, _ = s3
    fastkd.storage.configure([*FAST_RETRIES, "max_retries=1"])
    second = remote.split("{")[0] + "000001.tar"
    server.faults.fail(100, 503, method="GET", path="000001")
    with pytest.raises(StorageError, match=rf"^{second}: ranged read failed .*503"):
        open_dataset(remote)
    server.faults.clear()
    sharded = open_dataset(remote)
    items = _views(sharded)  # the headers
    server.faults.fail(100, "drop", method="GET", path="000001")
    with pytest.raises(StorageError, match=rf"^{second}: ranged read failed .*error sending"):
        sharded.read_many(np.arange(len(sharded)))
    for workers in (0, 1):  # a loader stops, never skips the images; one line from a worker
        with pytest.raises(StorageError, match=rf"^{second}: ranged read failed") as caught:
            _load(sharded, items, "torch", on_bad_image="skip", num_workers=workers)
        assert "Traceback" not in str(caught.value)


def test_missing_and_compressed_remote_shards_are_named(s3, remote: str, local_shards: str) -> None:
    server, bucket = s3
    base = remote.split("{")[0]
    with pytest.raises(DatasetError, match=rf"shard {base}000003.tar does not exist \(1 of the 4"):
        open_dataset(base + "{000000..000003}.tar")
    _upload(server, base + "packed.tar", _gzip(Path(local_shards).parent / "digits-000000.tar"))
    with pytest.raises(DatasetError, match=r"packed.tar is gzip-compressed"):
        open_dataset(base + "packed.tar")
    with pytest.raises(DatasetError, match="on object storage fastkd reads WebDataset tar shards"):
        open_dataset(f"s3://{bucket}/images")


def _gzip(path: Path) -> bytes:
    import gzip

    return gzip.compress(path.read_bytes())


def test_spans_join_near_ranges_only() -> None:
    assert spans([0, 100, 10_000_000], [50, 50, 10], gap=1000) == [
        (0, 150, [0, 1]),
        (10_000_000, 10_000_010, [2]),
    ]
    assert spans([300, 0], [10, 200], gap=100, max_span=250) == [(0, 200, [1]), (300, 310, [0])]


def test_dump_train_and_eval_on_remote_shards(
    s3, digits_small: Path, digit_pool, tmp_path: Path
) -> None:
    """The commands take s3:// shards (and --storage-option); a member rewritten at its size
    after the dump is refused by its content hash, a resized one by the store's fingerprint."""
    server, bucket = s3
    small = _first_per_class(digits_small, tmp_path / "small", 2)  # 20 images: CPU time
    local = write_shards(small, tmp_path / "shards")
    data = _put_shards(server, bucket, local, "small")
    options = ["--storage-option", "init_backoff=0.01"]
    store, pool = tmp_path / "store.zarr", digit_pool[:1]
    run_cli(_dump_args(data, pool, store, *options))
    assert run_cli(_dump_args(data, pool, store)).count("2 already done") == 1  # resumed

    convnext = digit_pool[0]
    val = data.split("{")[0] + "000002.tar"  # one shard: digits 7-9
    train = [*("train", "--data", data, "--store", str(store), "--val-data", val, *options)]
    train += [*("--student", f"s:{convnext.arch}={convnext.checkpoint}", "--epochs", "1")]
    train += ["--lr", "1e-3"]
    train += [*("--batch-size", "16", "--backend", "torch", "--workers", "0", "--no-progress")]
    run_cli([*train, "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "s.pt").is_file()
    evaluate = ["eval", "--model", convnext.spec, "--backend", "torch", "--out"]
    run_cli([*evaluate, str(tmp_path / "eval"), "--data", data, *options])
    refused = run_cli([*evaluate, str(tmp_path / "local"), "--data", local, *options], 2)
    assert "--storage-option is for object storage URLs" in refused  # it would do nothing
    run_cli([*evaluate, str(tmp_path / "local"), "--data", local])
    assert (tmp_path / "eval" / "report.json").read_text() == (
        tmp_path / "local" / "report.json"
    ).read_text()

    def other(png: bytes) -> bytes:
        (tmp_path / "x.png").write_bytes(png)
        return same_size_other_png(tmp_path / "x.png")

    shard = data.split("{")[0] + "000001.tar"
    for change, why in [(other, "changed since the dump"), (_grown, "fingerprint: store has")]:
        member = _rewrite_member(local, 1, 2, change).rpartition(":")[2]
        _put_shards(server, bucket, local, "small")
        refused = run_cli([*train, "--out", str(tmp_path / why[:7])], expect_code=2)
        assert why in refused, refused
        assert change is _grown or f"{shard}:{member}" in refused, refused


def _grown(png: bytes) -> bytes:
    return png + b"\0" * 16
