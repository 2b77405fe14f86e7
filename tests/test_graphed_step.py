"""``--cuda-graphs`` on CPU: the logic around the graph, with a stand-in for the CUDA graph.

``StandInGraphs`` plays ``torch.cuda.CUDAGraph``'s part in ``GraphedStep``: the capture takes
the step once on the static inputs and keeps the step function; a replay runs it again on those
same inputs, with every number a graph freezes at capture (each optimiser group's non-tensor
hyper-parameters, the learning rate among them) put back for the replay, and writes its results
into the capture's output tensors, as a graph's replay overwrites its static outputs. So a step
that took a new batch's inputs without copying them into the buffers, kept a static output
without copying it out, or left the schedule's learning rate a number, trains differently from
the eager steps here, as it would on a GPU. tests/test_graphed_step_cuda.py is the real graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor
from training_pool import config, make_pool
from typer.testing import CliRunner

from fastkd.cli.main import app
from fastkd.errors import ConfigError, NonFiniteError
from fastkd.runtime import DistContext
from fastkd.training import Batch, Trainer
from fastkd.training.graphed_step import GraphedStep, StepOutputs
from fastkd.training.learners import set_capturable
from fastkd.training.steps import SkipFlag

pytestmark = pytest.mark.filterwarnings("ignore::fastkd.training.ViewsRepeatWarning")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("graph-pool"))


@pytest.fixture(autouse=True)
def torch_reference_loss(monkeypatch) -> None:
    """The loss by its torch reference, not the Triton interpreter (a second a step): what is
    tested here is the step around the loss; the real kernels in a real graph are the GPU
    test's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


class StandInGraphs:
    """``torch.cuda.CUDAGraph`` on CPU (module docstring)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.warmups = self.captures = self.replays = 0

    def warmup(self) -> contextlib.AbstractContextManager[None]:
        self.warmups += 1
        return contextlib.nullcontext()

    def _numbers(self) -> list[list[dict]]:
        return [
            [
                {k: v for k, v in g.items() if not isinstance(v, Tensor | list)}
                for g in o.param_groups
            ]
            for o in self.optimizers
        ]

    def capture(self, step):
        self.captures += 1
        self.step, self.frozen = step, self._numbers()
        self.outputs = step()
        return self.outputs

    def replay(self) -> None:
        self.replays += 1
        now = self._numbers()
        self._put(self.frozen)  # what the graph recorded, not what the host holds now
        try:
            fresh = self.step()
        finally:
            self._put(now)
        self.outputs.totals.copy_(fresh.totals)
        for into, rows in zip(self.outputs.finite_rows, fresh.finite_rows, strict=True):
            into.copy_(rows)

    def _put(self, numbers: list[list[dict]]) -> None:
        for optimizer, groups in zip(self.optimizers, numbers, strict=True):
            for group, values in zip(optimizer.param_groups, groups, strict=True):
                group.update(values)


ARMS = {  # each kind of step, with both optimisers; a cosine schedule moving over the steps
    "offline": {"lr_schedule": "cosine", "epochs": 3},
    "live": {"teachers": "live", "optimizer": "sgd", "lr": 1e-2, "lr_schedule": "cosine",
             "epochs": 3},
    "joint": {"joint": True, "student": None, "store": None, "views": 2, "lr_schedule": "cosine",
              "epochs": 3},
    "none": {"teachers": "none", "store": None, "models": ()},
}  # fmt: skip
# Batches 0 and 1 are full (16 rows), 2 is the epoch's short last one (15 of 47 rows): one
# warm-up step, the capture, the short batch (eager), a replay on other inputs than the capture's.
ORDER = (0, 1, 2, 0)
WARMUP = 1


def graphed(trainer: Trainer) -> StandInGraphs:
    stand_in = StandInGraphs([learner.optimizer for learner in trainer.learners])
    trainer.use_cuda_graphs(stand_in, warmup=WARMUP)
    return stand_in


def train(trainer: Trainer, batches: list) -> list[float]:
    """The steps of ``ORDER``, their records read at the end (after later steps ran)."""
    records = [trainer.train_step(batches[index]) for index in ORDER]
    return [trainer.read_step(record).loss for record in records]


@pytest.mark.parametrize("arm", ARMS)
def test_replays_train_as_the_eager_steps(pool, tmp_path, arm):
    eager = Trainer(config(pool, tmp_path / "eager", **ARMS[arm]))
    for learner in eager.learners:  # the same optimiser, its lr a tensor, stepped eagerly
        set_capturable(learner.optimizer, True)
    batches = list(eager.batches(eager.plan(0)))
    assert [len(b.samples) for b in batches] == [16, 16, 15]
    expected = train(eager, batches)

    trainer = Trainer(config(pool, tmp_path / "graphed", **ARMS[arm]))
    stand_in = graphed(trainer)
    losses = train(trainer, batches)

    assert stand_in.warmups == WARMUP and stand_in.captures == 1
    assert stand_in.replays == 1  # and the capture took one step: 2 of the 3 full batches
    assert trainer.graphed.eager == WARMUP + 1  # the short batch ran eagerly
    assert losses == expected
    for mine, theirs in zip(trainer.learners, eager.learners, strict=True):
        torch.testing.assert_close(
            mine.model.state_dict(), theirs.model.state_dict(), rtol=0, atol=0
        )
        lr = mine.optimizer.param_groups[0]["lr"]
        assert isinstance(lr, Tensor) and lr.dtype == torch.float32
        assert torch.equal(lr, theirs.optimizer.param_groups[0]["lr"])
    if arm != "none":  # the schedule moved the lr the replays read
        assert float(lr) < trainer.cfg.learning_rate * 0.9


def test_the_schedule_fills_the_lr_tensor_the_graph_captured(pool, tmp_path):
    trainer = Trainer(config(pool, tmp_path, lr_schedule="cosine", epochs=3))
    graphed(trainer)
    lr = trainer.learners[0].optimizer.param_groups[0]["lr"]
    batch = next(trainer.batches(trainer.plan(0)))
    for _ in range(WARMUP + 2):
        trainer.read_step(trainer.train_step(batch))
    assert trainer.learners[0].optimizer.param_groups[0]["lr"] is lr  # the same tensor
    schedule = trainer.learners[0].scheduler
    expected = schedule.base_lrs[0] * schedule.lr_lambdas[0](WARMUP + 2)
    assert float(lr) == pytest.approx(expected, rel=1e-6)


def test_the_skip_flag_is_one_tensor_updated_in_place():
    flag = SkipFlag(torch.device("cpu"))
    value = flag.value
    assert flag.update(torch.tensor(0.0)) is value and float(value) == 0.0
    assert flag.update(torch.tensor(2.0)) is value and float(value) == 1.0
    assert flag.update(torch.tensor(0.0)) is value and float(value) == 1.0  # sticky
    flag.reset()
    assert flag.value is value and float(value) == 0.0


def test_a_non_finite_replay_changes_nothing_and_names_the_step(pool, tmp_path):
    trainer = Trainer(config(pool, tmp_path, lr_schedule="cosine", epochs=2))
    graphed(trainer)
    batch = next(trainer.batches(trainer.plan(0)))
    for _ in range(WARMUP + 1):  # the last one captures
        trainer.read_step(trainer.train_step(batch))
    learner = trainer.learners[0]
    saved = {k: v.clone() for k, v in learner.model.state_dict().items()}
    lr = float(learner.optimizer.param_groups[0]["lr"])
    nan = [torch.full_like(image, float("nan")) for image in batch.images]
    bad = trainer.train_step(dataclasses.replace(batch, images=nan))  # a replay
    trainer.train_step(batch)  # queued before the host reads ``bad``: skipped too
    with pytest.raises(NonFiniteError, match=r"step 3 \(epoch 1\): NaN/inf logits of 's'"):
        trainer.read_step(bad)
    torch.testing.assert_close(learner.model.state_dict(), saved, rtol=0, atol=0)
    assert float(learner.optimizer.param_groups[0]["lr"]) == lr  # the schedule rewound
    assert trainer.graphed.replays == 3


def test_resume_restores_the_lr_as_each_run_takes_it(pool, tmp_path):
    cfg = config(pool, tmp_path, lr_schedule="cosine", epochs=2)
    trainer = Trainer(cfg)
    graphed(trainer)
    batch = next(trainer.batches(trainer.plan(0)))
    for _ in range(WARMUP + 2):
        trainer.read_step(trainer.train_step(batch))
    lr = float(trainer.learners[0].optimizer.param_groups[0]["lr"])
    # saved by a --cuda-graphs run (as its config says): its lr a tensor
    trainer.run_checkpoints.cfg = dataclasses.replace(cfg, cuda_graphs=True)
    trainer.save_state(tmp_path / "state.pt")

    eager = Trainer(dataclasses.replace(cfg, resume=True))
    eager.load_state(tmp_path / "state.pt")
    group = eager.learners[0].optimizer.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(lr)
    assert group["capturable"] is False

    again = Trainer(dataclasses.replace(cfg, resume=True))
    stand_in = graphed(again)
    for _ in range(WARMUP + 1):
        again.read_step(again.train_step(batch))
    assert stand_in.captures == 1
    again.load_state(tmp_path / "state.pt")  # new optimiser state: the graph is dropped
    group = again.learners[0].optimizer.param_groups[0]
    assert isinstance(group["lr"], Tensor) and group["lr"].dtype == torch.float32
    assert float(group["lr"]) == pytest.approx(lr) and group["capturable"] is True
    for _ in range(WARMUP + 1):  # warmed up and captured again
        again.read_step(again.train_step(batch))
    assert stand_in.captures == 2 and stand_in.warmups == 2 * WARMUP


def test_the_refusals_name_the_option(pool, tmp_path):
    with pytest.raises(ConfigError, match=r"--cuda-graphs .* needs a CUDA device, .* cpu"):
        Trainer(config(pool, tmp_path, cuda_graphs=True, device="cpu"))
    with pytest.raises(ConfigError, match=r"under torchrun \(world size 2\)"):
        Trainer(config(pool, tmp_path, cuda_graphs=True), dist_context=DistContext(0, 2, 0))
    with pytest.raises(ConfigError, match=r"--compile and --cuda-graphs"):
        config(pool, tmp_path, cuda_graphs=True, torch_compile=True)
    with pytest.raises(ConfigError, match=r"--compile under torchrun \(world size 2\)"):
        Trainer(config(pool, tmp_path, torch_compile=True), dist_context=DistContext(0, 2, 0))


def test_cli_refuses_cuda_graphs_without_a_gpu_in_one_line(pool, tmp_path):
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--out", str(tmp_path / "run"), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--cuda-graphs"], env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--cuda-graphs" in lines[0]


def _batch(rows: int, first: int) -> Batch:
    labels = torch.arange(first, first + rows)
    return Batch(np.arange(rows), np.zeros(rows, int), labels, [labels[:, None] * 1.0], 4)


def test_only_a_full_batch_is_captured_and_each_replay_reads_its_own_inputs():
    def step(batch: Batch) -> StepOutputs:  # a stand-in step: its outputs from its inputs
        total = batch.images[0].sum() + batch.labels.sum()
        return StepOutputs(total.reshape(1), (batch.labels > 1,), True)

    stand_in = StandInGraphs([])
    graphed_step = GraphedStep(step, rows=4, global_rows=4, backend=stand_in, warmup=0)
    short = graphed_step.run(_batch(3, 0))  # the epoch's short batch, before any capture
    assert stand_in.captures == 0 and graphed_step.eager == 1 and short.totals.tolist() == [6]
    outputs = [graphed_step.run(_batch(4, first)) for first in (0, 10, 20)]
    assert stand_in.captures == 1 and stand_in.replays == 2
    assert [o.totals.tolist() for o in outputs] == [[12], [92], [172]]  # 2 x sum of labels
    assert [o.finite_rows[0].tolist() for o in outputs] == [[False, False, True, True]] + [
        [True] * 4
    ] * 2


def test_bench_graphs_measures_eager_steps_and_says_why_not_graphed_on_cpu(tmp_path):
    from fastkd.bench import graphs

    out = tmp_path / "graphs.json"
    graphs.main(["--device", "cpu", "--kinds", "ce", "--steps", "1", "--warmup", "1",
                 "--cached", "1", "--images", "20", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["settings"]["input_size"] == 32
    ce = result["kinds"]["ce"]
    assert ce["eager"]["timed_steps"] == 1 and ce["eager"]["images_per_s"] > 0
    assert ce["graphed"] is None and "--cuda-graphs" in ce["not_graphed"]


class _Refusing(StandInGraphs):
    def capture(self, step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def test_a_step_cuda_cannot_capture_is_refused_naming_the_option():
    def step(batch: Batch) -> StepOutputs:
        return StepOutputs(batch.labels.sum().reshape(1), (), False)

    graphed_step = GraphedStep(step, rows=4, global_rows=4, backend=_Refusing([]), warmup=1)
    graphed_step.run(_batch(4, 0))  # the warm-up
    with pytest.raises(ConfigError, match=r"--cuda-graphs: .* could not be captured .* stream "):
        graphed_step.run(_batch(4, 0))
