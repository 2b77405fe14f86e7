"""A loss call as ``fastkd train`` makes it launches at most three tensor operations besides the
Triton loss kernel, forward and backward together.

Counted on CPU: ``capture_launches`` records the Triton launches instead of running them, and
``kernels.launch.CountOperations`` counts every aten operation that would launch a kernel on a GPU
(not views, detach / alias or empty allocations; each ``fastkd`` custom op's own body counts)
across the strategy's loss call and ``loss.backward()``. Each count is of a run's second call, as
in every step after its first.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from fastkd.choices import Reduction
from fastkd.kernels import PoolTargets
from fastkd.kernels.launch import CountOperations, capture_launches
from fastkd.kernels.partitioned_reference import plain_targets
from fastkd.loss_settings import LossSettings
from fastkd.training.strategy import JointBiKD, LiveTeachers, StoredTargets

MAX_OPS = 3  # issue 25: at most three operations besides the loss kernel a training call
ROWS, MEMBERS, CLASSES = 8, 3, 40


def _stored(topk: int) -> PoolTargets:
    """Targets in the dtypes a store's reader hands over (fp16 log-probabilities, fp32 masses)."""
    gen = torch.Generator().manual_seed(topk)
    pool = torch.randn(ROWS, MEMBERS, CLASSES, generator=gen) * 3
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    targets = PoolTargets.from_logits(pool, labels, topk)
    if targets.is_sparse:  # a store keeps it in fp16; its reader hands it over in fp32
        targets.log_tail_sqrt = targets.log_tail_sqrt.float()
    return targets


def _strategy(kind: type, mode: str = "live") -> SimpleNamespace:
    """A strategy object with just what its loss reads: the run's settings and columns."""
    strategy = kind.__new__(kind)
    settings = LossSettings(mode=mode, temperature=2.0)
    strategy.cfg = SimpleNamespace(loss=settings)
    strategy.self_index = None
    strategy._prepare_loss()
    return strategy


def _count(call, leaves: list[torch.Tensor]) -> tuple[Counter, int]:
    """Operations and Triton launches of ``call()`` (the loss) and its ``backward()``, a step
    after the first: what a run's first step builds and keeps (configs, constant tensors) is
    built once, not per step."""
    with capture_launches():
        call()[0].backward()
    for leaf in leaves:
        leaf.grad = None
    with capture_launches() as launches, CountOperations() as counter:
        loss, _stats = call()
        loss.backward()
    assert all(leaf.grad is not None for leaf in leaves)
    return counter.operations, len(launches)


def _batch(labels: torch.Tensor, targets: PoolTargets | None = None) -> SimpleNamespace:
    return SimpleNamespace(labels=labels, targets=targets)


@pytest.mark.parametrize("mode", ["live", "plain"])
@pytest.mark.parametrize("topk", [0, 10], ids=["dense", "top-10"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_stored_targets_call_launches_at_most_three_operations(topk, dtype, mode):
    """Plain KD's mixture is made with the targets, where the store's rows are read (here as
    ``StoredTargets.read`` makes it), not in the loss call."""
    targets = _stored(topk)
    labels = torch.randint(0, CLASSES, (ROWS,))
    logits = torch.randn(ROWS, CLASSES, dtype=dtype, requires_grad=True)
    strategy = _strategy(StoredTargets, mode)
    if mode == "plain":
        targets = plain_targets(targets, labels, CLASSES, strategy._plain)
    batch = _batch(labels, targets)
    ops, launches = _count(lambda: strategy.loss([logits], batch, 0.125), [logits])
    assert launches == 1, "the loss is one kernel launch"
    assert sum(ops.values()) <= MAX_OPS, sorted(ops.items())


def test_a_live_teachers_call_launches_at_most_three_operations():
    """Live teachers' targets are the pool's logits kept dense in fp32: the same loss call."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    targets = PoolTargets.from_logits(torch.randn(ROWS, MEMBERS, CLASSES, generator=gen), labels)
    logits = torch.randn(ROWS, CLASSES, generator=gen, requires_grad=True)
    strategy = _strategy(LiveTeachers, mode="best")
    ops, launches = _count(
        lambda: strategy._partitioned([logits], _batch(labels), targets, 0.5), [logits]
    )
    assert launches == 1
    assert sum(ops.values()) <= MAX_OPS, sorted(ops.items())


@pytest.mark.parametrize("models", [2, 3])
def test_a_joint_call_launches_at_most_three_operations(models):
    labels = torch.randint(0, CLASSES, (ROWS,))
    logits = [torch.randn(ROWS, CLASSES, requires_grad=True) for _ in range(models)]
    strategy = _strategy(JointBiKD)
    ops, launches = _count(lambda: strategy.loss(logits, _batch(labels), 0.25), logits)
    assert launches == 1
    assert sum(ops.values()) <= MAX_OPS, sorted(ops.items())


def test_the_counter_sees_the_work_it_must_forbid():
    """The public function keeps its checks: counted, they are far above three (the counter
    is not blind to them)."""
    targets = _stored(10)
    labels = torch.randint(0, CLASSES, (ROWS,))
    logits = torch.randn(ROWS, CLASSES, requires_grad=True)
    settings = dataclasses.replace(LossSettings(), reduction=Reduction.MEAN)
    from fastkd.kernels import partitioned_kd_loss

    ops, _ = _count(lambda: partitioned_kd_loss(logits, labels, targets, settings), [logits])
    assert sum(ops.values()) > MAX_OPS
    assert ops["aten::ge"] and ops["aten::lt"], "the labels' and ids' range checks"
