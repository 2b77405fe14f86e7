"""DistributedDataParallel: two CPU processes (torchrun, gloo) take the steps one process takes.

Both runs train the same student on the same global batches of 16 stored (sample, view) rows;
each rank gets a disjoint half of every batch (the last batch of 15 rows is split 8 + 7, so a
per-rank mean would weigh the rows wrongly) and the loss is normalised by the global batch, so the
gradients agree up to the order of fp32 sums in gloo's all-reduce. The student is a ViT (LayerNorm: no batch statistics that differ per rank);
SGD keeps those rounding differences from being rescaled as Adam's first steps would.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from training_pool import make_pool

from fastkd.data import open_dataset
from fastkd.evaluation import evaluate
from fastkd.models import ModelSpec, load_model
from fastkd.training import TrainConfig, train

TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}  # fp32 all-reduce order, 6 steps of SGD
# The run both ways (TrainConfig fields): 2 epochs of 47 rows in batches of 16, SGD.
RUN = {
    "epochs": 2,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.05,
    "device": "cpu",
    "backend": "torch",
    "num_workers": 0,
}
_FLAGS = {"num_workers": "--workers", "out_dir": "--out"}


def cli_options(**fields) -> list[str]:
    """TrainConfig fields as the `fastkd train` options that set them."""
    options = []
    for name, value in fields.items():
        options += [_FLAGS.get(name, "--" + name.replace("_", "-")), str(value)]
    return options


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("ddp-pool"))


def test_two_gloo_ranks_agree_with_one_process(pool, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "fastkd.cli.main", "train"]
    command += cli_options(
        data=pool.train,
        store=pool.store,
        student=pool.specs["s"],
        **RUN,
        val_data=pool.val,
        out_dir=tmp_path / "ddp",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    single = train(
        TrainConfig(
            data=pool.train,
            store=pool.store,
            student=pool.specs["s"],
            **RUN,
            val_data=pool.val,
            out_dir=tmp_path / "single",
            progress=False,
        )
    )
    two = torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)
    one = torch.load(single.state, weights_only=True)
    assert (two["epoch"], two["step"]) == (one["epoch"], one["step"]) == (2, 6)
    assert len(two["rng"]) == 2  # each rank's random state, for resuming on two ranks
    initial = torch.load(pool.root / "s.pt", weights_only=True)["state_dict"]
    moved = 0
    for key, expected in one["learners"]["s"]["model"].items():
        torch.testing.assert_close(two["learners"]["s"]["model"][key], expected, **TOLERANCE)
        moved += not torch.equal(expected, initial[key])
    assert moved > 10  # the runs really trained
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # (a sample's prediction may flip on fp32 rounding between the runs: 2.5% each)
        assert a["val_top1"]["s"] == pytest.approx(b["val_top1"]["s"], abs=2.6)
    # Each rank validated its half of the 40 images: the summed counts are the whole set's.
    loaded = load_model(ModelSpec.parse(pool.specs["s"]))
    loaded.model.load_state_dict(two["learners"]["s"]["model"])
    val = open_dataset(pool.val)
    models, configs = {"s": loaded.model}, {"s": loaded.data_config}
    predictions = evaluate(models, configs, val, batch_size=16, backend="torch")["s"]
    top1 = 100.0 * (int((predictions == val.labels).sum()) / len(val))
    assert two["history"][-1]["val_top1"]["s"] == top1
