"""Two torchrun "nodes" on the loopback address share nothing but an S3 bucket (moto's server),
which holds the data as tar shards: together they dump one store into it, then train from it
with DDP (gloo, one process each).

The store equals a single-process dump's bit for bit; the trained weights equal a single-process
run's to the tolerance of the DDP test (test_ddp.py): fp32 all-reduce order, 6 steps of SGD.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from test_ddp import RUN, TOLERANCE, cli_options
from test_shards import write_tar
from training_pool import make_pool

from fastkd.data import open_dataset
from fastkd.store import StoreReader
from fastkd.training import TrainConfig, train

DUMP = ["--views", "2", "--batch-size", "8", "--samples-per-shard", "8", "--backend", "torch"]
DUMP += ["--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("multinode-pool"))


def shards_in_bucket(server, bucket: str, file_list, folder) -> tuple[str, str]:
    """The file list's images as 3 tar shards, locally and in the bucket: both brace patterns."""
    dataset = open_dataset(file_list)
    folder.mkdir()
    cuts = np.linspace(0, len(dataset), 4).astype(int)
    for index in range(3):
        members = []
        for sample in range(cuts[index], cuts[index + 1]):
            key = dataset.keys[sample].removesuffix(".png")
            image = (file_list.parent / dataset.keys[sample]).read_bytes()
            members += [(f"{key}.png", image), (f"{key}.cls", str(dataset.labels[sample]).encode())]
        shard = write_tar(folder / f"train-{index:06d}.tar", members)
        server.client().put_object(Bucket=bucket, Key=f"data/{shard.name}", Body=shard.read_bytes())
    pattern = "train-{000000..000002}.tar"
    return f"s3://{bucket}/data/{pattern}", str(folder / pattern)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_nodes(args: list[str], tmp_path, name: str) -> None:
    """``fastkd ARGS`` as a torchrun job of two nodes of one process each, rendezvous (c10d) and
    gloo on 127.0.0.1; each node a separate torchrun, as on a cluster."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}  # a log line stays one line
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    nodes = []
    for rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        command += ["--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name]
        command += ["--local-addr", "127.0.0.1", "-m", "fastkd.cli.main", *args]
        log = (tmp_path / f"{name}-node{rank}.log").open("w")
        nodes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [node.wait(timeout=300) for node, _ in nodes]
    finally:
        for node, log in nodes:
            node.kill()
            log.close()
    logs = "\n".join((tmp_path / f"{name}-node{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs


def test_two_nodes_dump_and_train_through_one_bucket(s3, pool, tmp_path):
    server, bucket = s3
    data, local_data = shards_in_bucket(server, bucket, pool.train, tmp_path / "shards")
    url = f"s3://{bucket}/pool/store.zarr"
    models = [arg for name in ("a", "b") for arg in ("--model", pool.specs[name])]
    two_nodes(["dump", "--data", data, *models, "--out", url, *DUMP], tmp_path, "dump")

    single = tmp_path / "single.zarr"
    command = [sys.executable, "-m", "fastkd.cli.main", "dump", "--data", local_data]
    done = subprocess.run(
        [*command, *models, "--out", str(single), *DUMP],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as the nodes: the same fp32 sums
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote, local = StoreReader(url), StoreReader(single)
    assert remote.manifest == local.manifest
    assert remote.layout.num_blocks == 6  # 47 samples: each node wrote 3 blocks
    for rank in range(2):
        log = (tmp_path / f"dump-node{rank}.log").read_text()
        assert f"part {rank}/2: 3 blocks to write" in log, log[-2000:]
    local_group = zarr.open_group(single, mode="r")
    remote_group = remote._group
    for name, array in local_group.arrays():
        np.testing.assert_array_equal(remote_group[name][:], array[:], err_msg=name, strict=True)
    for member in ("a", "b"):
        for name, array in local_group["models"][member].arrays():
            np.testing.assert_array_equal(
                remote_group[f"models/{member}/{name}"][:], array[:], err_msg=name, strict=True
            )
    assert remote_group.attrs["fastkd_status"]["complete"] is True

    options = cli_options(
        data=data, store=url, student=pool.specs["s"], **RUN, out_dir=tmp_path / "ddp"
    )
    two_nodes(["train", *options, "--no-progress"], tmp_path, "train")
    one = train(
        TrainConfig(
            data=local_data,
            store=single,
            student=pool.specs["s"],
            **RUN,
            out_dir=tmp_path / "single",
            progress=False,
            report=False,
        )
    )
    two = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    one = torch.load(one.state, weights_only=True)
    assert (two["epoch"], two["step"]) == (one["epoch"], one["step"]) == (2, 6)
    assert len(two["rng"]) == 2
    for key, expected in one["learners"]["s"]["model"].items():
        torch.testing.assert_close(two["learners"]["s"]["model"][key], expected, **TOLERANCE)
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
