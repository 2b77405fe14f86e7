"""``--cuda-graphs`` on a GPU: a replayed training step trains as the eager step does.

For each kind of step (offline stored targets with Adam and a cosine schedule, live teachers and
joint Bi-KD with SGD), one trainer takes its steps eagerly, another by CUDA-graph replay
(``GraphedStep`` over ``torch.cuda.CUDAGraph``): the graph's warm-up, its capture, replays on
other batches, the epoch's short last batch eagerly in between. Both read the same batches; the
eager one's optimiser is made capturable too (its lr an fp32 tensor), so both run the same
kernels on the same numbers, and cuDNN is held deterministic. Their losses and weights must
agree: SGD's to rounding; Adam's weights looser, as Adam's normalised step turns a rounding
difference in a near-zero gradient into up to one lr. One replay runs under
``torch.cuda.set_sync_debug_mode("error")``: copying the inputs in and the record out never
waits on the host.

Skipped without CUDA and when ``TRITON_INTERPRET=1`` (the interpreter cannot be captured);
``scripts/gpu-check`` (stage ``cuda-graphs``) runs it with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from test_gpu_steps import gpu_store, train_config  # noqa: F401 - the GPU store fixture

from fastkd.training import Trainer
from fastkd.training.graphed_step import WARMUP_STEPS
from fastkd.training.learners import set_capturable

pytest_plugins = ("digits_pool",)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and TRITON_INTERPRET unset or 0 (scripts/gpu-check on a GPU machine)",
)

CASES = {  # kind: (optimiser settings, weights' tolerance (rtol, atol))
    "offline": ({"optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine", "epochs": 3}, 2e-3),
    "live": ({"optimizer": "sgd", "lr": 1e-2}, 1e-5),
    "joint": ({"optimizer": "sgd", "lr": 1e-2}, 1e-5),
}
# digits_small's 60 images in batches of 16: three full batches, then 12 rows. The warm-up takes
# the first WARMUP_STEPS, the capture the next, then replays around the short batch.
ORDER = (*(i % 3 for i in range(WARMUP_STEPS)), 0, 1, 3, 2, 0)


@pytest.fixture
def deterministic():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _trainer(kind, digits_small, digit_pool, store, out, graphs: bool) -> Trainer:
    settings, _ = CASES[kind]
    cfg = train_config(kind, digits_small, digit_pool, store, out)
    return Trainer(dataclasses.replace(cfg, **settings, cuda_graphs=graphs))


@pytest.mark.parametrize("kind", CASES)
def test_replayed_steps_train_as_eager_steps(
    kind,
    digits_small,
    digit_pool,
    gpu_store,  # noqa: F811 - test_gpu_steps' fixture
    tmp_path,
    deterministic,
):
    eager = _trainer(kind, digits_small, digit_pool, gpu_store, tmp_path / "eager", False)
    for learner in eager.learners:
        set_capturable(learner.optimizer, True)
    batches = list(eager.batches(eager.plan(0)))
    assert [len(b.samples) for b in batches] == [16, 16, 16, 12]
    expected = [eager.train_step(batches[i]) for i in ORDER]

    graphed = _trainer(kind, digits_small, digit_pool, gpu_store, tmp_path / "graphed", True)
    records = []
    for step, index in enumerate(ORDER):
        if step == len(ORDER) - 1:  # a replay, under the sync check
            torch.cuda.synchronize()
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                records.append(graphed.train_step(batches[index]))
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        else:
            records.append(graphed.train_step(batches[index]))
    torch.cuda.synchronize()

    assert graphed.graphed.replays == len(ORDER) - WARMUP_STEPS - 1  # all full batches but these
    assert graphed.graphed.eager == WARMUP_STEPS + 1
    losses = [graphed.read_step(r).loss for r in records]
    torch.testing.assert_close(losses, [eager.read_step(r).loss for r in expected], rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    _, atol = CASES[kind]
    for mine, theirs in zip(graphed.learners, eager.learners, strict=True):
        torch.testing.assert_close(
            mine.model.state_dict(), theirs.model.state_dict(), rtol=1e-3, atol=atol
        )
        assert torch.equal(
            mine.optimizer.param_groups[0]["lr"], theirs.optimizer.param_groups[0]["lr"]
        )
