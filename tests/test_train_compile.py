"""``fastkd train --compile``: the learners' forward and the loss as one ``torch.compile``'d graph.

The compiled steps train as the eager ones (the same losses and weights), for stored, live and
joint teaching and cross-entropy alone; a run compiles once for its full batches and once for
the epoch's short last batch, never per step. ``fullgraph=True``: a graph break fails the run.
The tests compile with ``aot_eager`` (``FASTKD_COMPILE_BACKEND``): the same trace, forward and
backward, as inductor, without generating C++ (inductor took 76 s for this pool's run on two
cores, the eager run 10 s).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from training_pool import config, make_pool
from typer.testing import CliRunner

from fastkd.cli.main import app
from fastkd.training import Trainer
from fastkd.training.compiled import BACKEND_ENV

pytestmark = pytest.mark.filterwarnings("ignore::fastkd.training.ViewsRepeatWarning")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("compile-pool"))


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")


def test_cli_train_compile_trains_as_eager_compiling_once_per_batch_shape(pool, tmp_path):
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--epochs", "2", "--batch-size", "16", "--lr", "1e-3"]
    args += ["--backend", "torch", "--workers", "0", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "eager")])
    assert result.exit_code == 0, result.output
    counters.clear()
    result = runner.invoke(app, [*args, "--compile", "--out", str(tmp_path / "compiled")])
    assert result.exit_code == 0, result.output
    # 47 rows in batches of 16: two steps of 16 rows share one graph, the 15-row step has its
    # own; the second epoch compiles nothing
    assert counters["stats"]["unique_graphs"] == 2

    def trained(run: str) -> tuple[float, dict[str, torch.Tensor]]:
        *_, epoch = json.loads((tmp_path / run / "history.json").read_text())
        path = tmp_path / run / "s.pt"
        return epoch["loss"], torch.load(path, weights_only=True)["state_dict"]

    loss, weights = trained("compiled")
    eager_loss, eager_weights = trained("eager")
    assert loss == pytest.approx(eager_loss, rel=1e-6, abs=0)
    torch.testing.assert_close(weights, eager_weights, rtol=1e-5, atol=1e-6)
    start = torch.load(pool.root / "s.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(weights[name], start[name]) for name in start)  # it trained


@pytest.mark.parametrize(
    "teaching",
    [
        {"teachers": "live", "store": None, "views": 2},
        {"joint": True, "student": None, "store": None, "views": 2},
        {"teachers": "none", "store": None, "models": (), "views": 2},
    ],
    ids=["live", "joint", "cross-entropy"],
)
def test_compiled_steps_take_the_eager_losses(pool, tmp_path, teaching):
    def losses(compiled: bool) -> list[float]:
        cfg = config(pool, tmp_path / str(compiled), torch_compile=compiled, **teaching)
        trainer = Trainer(cfg)
        batch = next(trainer.batches(trainer.plan(0)))
        return [trainer.train_step(batch).result().loss for _ in range(2)]

    counters.clear()
    compiled = losses(True)
    assert counters["stats"]["unique_graphs"] == 1  # the second step reused the first's graph
    eager = losses(False)
    # The first step: the same initial weights; the second: after the compiled backward's step.
    assert compiled == pytest.approx(eager, rel=1e-6, abs=0)
