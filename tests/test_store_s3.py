"""Stores on S3-compatible object storage (moto's server on 127.0.0.1): dump, inspect --verify,
repair, train and eval on an ``s3://`` store hold every guarantee of a local one.

The reference is the same dump into a local folder, read by plain zarr; the remote store is read
back by plain zarr over obstore, not through fastkd.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_shards import write_shards
from typer.testing import CliRunner

import fastkd
from fastkd.cli.main import app
from fastkd.errors import StoreBusyError
from fastkd.store import StoreReader, StoreWriter, open_manifest

pytest_plugins = ("digits_pool",)

SAMPLES_PER_SHARD = 8  # 60 digits -> 8 blocks


def run_cli(args: list[str], expect_code: int = 0) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert result.exit_code == expect_code, result.output + trace
    return result.output


def dump_args(data, pool, out, *extra) -> list[str]:
    models = [arg for member in pool for arg in ("--model", member.spec)]
    return [
        "dump", "--data", data, *models, "--out", out, "--views", "2", "--seed", "3",
        "--batch-size", "8", "--samples-per-shard", SAMPLES_PER_SHARD, "--workers", "0",
        "--backend", "torch", "--no-progress", *extra,
    ]  # fmt: skip


def remote_group(server, url: str) -> zarr.Group:
    """The store's group read by zarr over obstore alone (not fastkd's storage code)."""
    from obstore.store import S3Store
    from zarr.storage import ObjectStore

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    store = S3Store(
        bucket,
        prefix=prefix,
        config={"endpoint": server.moto_endpoint, "region": "us-east-1"},
        client_options={"allow_http": True},
    )
    return zarr.open_group(ObjectStore(store, read_only=True), mode="r", zarr_format=3)


def arrays_of(group: zarr.Group) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():  # .fastkd/ (claims) is not zarr
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    return {name: node[:] for name, node in members if isinstance(node, zarr.Array)}


def assert_same_arrays(a: zarr.Group, b: zarr.Group) -> None:
    arrays_a, arrays_b = arrays_of(a), arrays_of(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, values in arrays_a.items():
        np.testing.assert_array_equal(values, arrays_b[name], err_msg=name, strict=True)


@pytest.fixture(scope="module")
def local_shards(digits_small, tmp_path_factory) -> str:
    """The 60 digits as WebDataset tar shards on local disk: their brace pattern."""
    return write_shards(digits_small, tmp_path_factory.mktemp("s3-shards"))


@pytest.fixture(scope="module")
def local_store(local_shards, digit_pool, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3-reference") / "local.zarr"
    run_cli(dump_args(local_shards, digit_pool, out))
    return out


def upload_shards(server, bucket: str, pattern: str) -> str:
    """The local shards in the bucket: their s3:// brace pattern."""
    folder = Path(pattern).parent
    for shard in sorted(folder.glob("*.tar")):
        server.client().put_object(Bucket=bucket, Key=f"shards/{shard.name}", Body=shard.read_bytes())
    return f"s3://{bucket}/shards/{Path(pattern).name}"


def test_dump_inspect_repair_train_eval_on_s3(
    s3, local_shards, digit_pool, local_store, tmp_path
) -> None:
    """Shards and store in the bucket: the store equals the local dump of the local shards,
    and training from it takes the local run's steps."""
    server, bucket = s3
    data = upload_shards(server, bucket, local_shards)
    url = f"s3://{bucket}/stores/digits.zarr"
    server.faults.fail(3, 503, method="PUT")  # a throttled start: retried, nothing lost
    server.faults.fail(2, "drop", method="GET")
    run_cli(dump_args(data, digit_pool, url))
    assert server.faults.injected == 5
    group = remote_group(server, url)
    assert_same_arrays(group, zarr.open_group(local_store, mode="r"))
    assert group.attrs["fastkd_status"]["complete"] is True
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix="stores/digits.zarr/.fastkd/")
    assert [o["Key"] for o in listing["Contents"]] == ["stores/digits.zarr/.fastkd/store"]

    summary = json.loads(run_cli(["inspect", url, "--json"]))
    assert summary["blocks_done"] == 8 and summary["manifest"]["num_samples"] == 60
    assert "verified" in run_cli(["inspect", url, "--verify", "--no-progress"])

    # Damage two objects: one deleted, one with flipped bytes; both named by URL.
    member = digit_pool[0].name
    client = server.client()
    deleted = f"stores/digits.zarr/models/{member}/true_logprob/c/2/0"
    flipped = "stores/digits.zarr/boxes/c/5/0/0"
    client.delete_object(Bucket=bucket, Key=deleted)
    raw = bytearray(client.get_object(Bucket=bucket, Key=flipped)["Body"].read())
    raw[8:24] = bytes(b ^ 0x5A for b in raw[8:24])
    client.put_object(Bucket=bucket, Key=flipped, Body=bytes(raw))
    out = run_cli(["inspect", url, "--verify", "--no-progress"], expect_code=2)
    assert f"block 2 (samples 16-23), file s3://{bucket}/{deleted}: missing" in out
    assert f"boxes, block 5 (samples 40-47), file s3://{bucket}/{flipped}" in out
    run_cli(dump_args(data, digit_pool, url, "--repair"))
    assert "verified" in run_cli(["inspect", url, "--verify", "--no-progress"])

    # A server that stops answering is named as such, never taken for damaged blocks.
    server.faults.fail(10_000, 503, method="GET", path=r"/c/")
    impatient = ["--storage-option", "max_retries=1", "--storage-option", "init_backoff=0.01"]
    out = run_cli(["inspect", url, "--verify", "--no-progress", *impatient], expect_code=2)
    assert "503" in out and f"{bucket}/stores/digits.zarr" in out, out
    assert "damaged" not in out and "--repair" not in out, out
    server.faults.clear()
    assert_same_arrays(remote_group(server, url), zarr.open_group(local_store, mode="r"))

    # Training reads the remote store as it reads the local one: the same steps, bit for bit.
    common = ["--student", digit_pool[0].spec, "--epochs", "1"]
    common += ["--batch-size", "16", "--backend", "torch", "--workers", "0", "--device", "cpu"]
    common += ["--no-progress", "--seed", "1"]
    run_cli(["train", *common, "--data", data, "--store", url, "--out", tmp_path / "remote"])
    run_cli(
        ["train", *common, "--data", local_shards, "--store", local_store, "--out", tmp_path / "local"]
    )
    import torch

    remote = torch.load(tmp_path / "remote" / "state.pt", weights_only=True)
    local = torch.load(tmp_path / "local" / "state.pt", weights_only=True)
    assert remote["history"][0]["loss"] == local["history"][0]["loss"]
    for key, value in local["learners"][member]["model"].items():
        assert torch.equal(remote["learners"][member]["model"][key], value), key
    samples, views = np.arange(60), np.arange(60) % 2
    server.faults.clear()  # the Python API's storage options win over the environment's endpoint
    direct = {"endpoint": server.moto_endpoint, "max_retries": "2"}
    opened = fastkd.open_store(url, local_shards, storage_options=direct)
    assert opened.location.options.as_dict()["endpoint"] == server.moto_endpoint
    assert opened.keys and server.faults.requests == 0  # nothing went through the proxy

    # eval of the trained student on the shards in the bucket: the local shards' report
    trained = f"{member}:{digit_pool[0].arch}={tmp_path / 'remote' / (member + '.pt')}"
    for where, shards in (("eval-remote", data), ("eval-local", local_shards)):
        evaluate = ["eval", "--data", shards, "--model", trained, "--backend", "torch"]
        run_cli([*evaluate, "--out", tmp_path / where])
    report = (tmp_path / "eval-remote" / "report.json").read_text()
    assert report == (tmp_path / "eval-local" / "report.json").read_text()
    remote_rows = StoreReader(url).read(member, samples, views)
    local_rows = StoreReader(local_store).read(member, samples, views)
    for field in dataclasses.fields(local_rows):
        a, b = getattr(remote_rows, field.name), getattr(local_rows, field.name)
        assert (a is None and b is None) or np.array_equal(a, b), field.name


def test_killed_dump_resumes_on_s3_and_a_second_writer_is_refused(
    s3, local_shards, digit_pool, local_store
) -> None:
    server, bucket = s3
    data = upload_shards(server, bucket, local_shards)
    url = f"s3://{bucket}/killed.zarr"
    args = [str(a) for a in dump_args(data, digit_pool, url)]
    child = subprocess.Popen(
        [sys.executable, "-m", "fastkd.cli.main", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # the AWS_* variables of the `s3` fixture lead it to the test server
    try:
        deadline = time.monotonic() + 120
        done = np.zeros(0)
        while time.monotonic() < deadline and child.poll() is None:
            try:
                done = remote_group(server, url)["blocks_done"][:]
                if done.sum() >= 1:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass  # not created yet
            time.sleep(0.02)
        child.send_signal(signal.SIGSTOP)  # alive and holding its claim (a conditional PUT)
        assert child.poll() is None, f"the dump ended before it was stopped: {child.stderr.read()}"
        refused = run_cli(dump_args(data, digit_pool, url), expect_code=2)
        assert "overlaps the live claim" in refused and f"pid {child.pid}" in refused
        assert f"s3://{bucket}/killed.zarr/.fastkd/claims/" in refused  # what to delete, by URL
    finally:
        child.kill()  # no cleanup: its claim stays in the bucket, its pid is gone
        child.wait(timeout=30)
    done = remote_group(server, url)["blocks_done"][:]
    assert 0 < done.sum() < len(done)
    run_cli(dump_args(data, digit_pool, url))  # resumes; the dead claim is removed
    assert_same_arrays(remote_group(server, url), zarr.open_group(local_store, mode="r"))
    claims = server.client().list_objects_v2(Bucket=bucket, Prefix="killed.zarr/.fastkd/claims/")
    assert claims.get("KeyCount", 0) == 0


def test_claims_on_s3_use_conditional_writes(s3, local_store, monkeypatch) -> None:
    """Two writers of one part: the second is refused while the first lives; the creation lock
    is a create-if-absent object, so a held lock makes a second creator wait, then time out."""
    server, bucket = s3
    url = f"s3://{bucket}/claims.zarr"
    group = zarr.open_group(local_store, mode="r")
    manifest, _ = open_manifest(local_store)
    keys, labels, sizes = group["keys"][:].tolist(), group["labels"][:], group["sizes"][:]
    first = StoreWriter.create_or_resume(url, manifest, keys, labels, sizes, samples_per_shard=8)
    try:
        with pytest.raises(StoreBusyError, match="overlaps the live claim"):
            StoreWriter.create_or_resume(url, manifest, keys, labels, sizes)
        second = StoreWriter.create_or_resume(
            url, manifest, keys, labels, sizes, part=(1, 2), force_claim=True
        )  # forced: the first writer's claim is gone, it stops at its next block
        second.close()
        assert not first._claim.exists()
    finally:
        first.close()
    server.client().put_object(Bucket=bucket, Key="claims.zarr/.fastkd/lock", Body=b"{}")
    monkeypatch.setattr("fastkd.store.claims.LOCK_WAIT_S", 0.5)  # a holder we cannot read waits
    with pytest.raises(StoreBusyError, match=rf"delete s3://{bucket}/claims.zarr/.fastkd/lock"):
        StoreWriter.create_or_resume(url, manifest, keys, labels, sizes)
