"""A loss call as ``fastkd train`` makes it launches at most three tensor operations besides the
Triton loss kernel, forward and backward together.

Counted on CPU: ``capture_launches`` records the Triton launches instead of running them, and a
``TorchDispatchMode`` counts every aten operation that would launch a kernel on a GPU, across the
strategy's loss call and ``loss.backward()``. Not counted (``_FREE``), since none launches a
kernel on a GPU: views (``OpOverload.is_view``: slices, selects, expands, reshapes that alias),
``detach`` / ``alias`` (a new tensor over the same memory), and empty allocations (``empty*``,
``new_empty*``: the caching allocator hands out memory without a kernel). Fills, copies, casts,
reductions, comparisons and arithmetic all count, as does each ``fastkd`` custom op's own body
(the mode steps into it: the op is not a place to hide work). Each count is of a run's second
call, as in every step after its first.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd.choices import Reduction
from fastkd.kernels import PoolTargets
from fastkd.kernels.launch import capture_launches
from fastkd.loss_settings import LossSettings
from fastkd.training.strategy import JointBiKD, LiveTeachers, StoredTargets

MAX_OPS = 3  # issue 25: at most three operations besides the loss kernel a training call
ROWS, MEMBERS, CLASSES = 8, 3, 40
_FREE = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::detach",
    "aten::alias",
}


_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)  # below this mode's key


class CountOps(TorchDispatchMode):
    """Counts the aten operations that would launch a GPU kernel (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fastkd::"):  # step into the registered op: its body counts
            with self:
                return func.redispatch(_CPU, *args, **kwargs)
        if not (func.is_view or name in _FREE):
            self.ops[name] += 1
        return func(*args, **kwargs)


def _stored(topk: int) -> PoolTargets:
    """Targets in the dtypes a store's reader hands over (fp16 log-probabilities, fp32 masses)."""
    gen = torch.Generator().manual_seed(topk)
    pool = torch.randn(ROWS, MEMBERS, CLASSES, generator=gen) * 3
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    return PoolTargets.from_logits(pool, labels, topk)


def _strategy(kind: type, mode: str = "live") -> SimpleNamespace:
    """A strategy object with just what its loss reads: the run's settings and columns."""
    strategy = kind.__new__(kind)
    settings = LossSettings(mode=mode, temperature=2.0)
    strategy.cfg = SimpleNamespace(loss=settings)
    strategy.self_index = None
    return strategy


def _count(call, leaves: list[torch.Tensor]) -> tuple[Counter, int]:
    """Operations and Triton launches of ``call()`` (the loss) and its ``backward()``, a step
    after the first: what a run's first step builds and keeps (configs, constant tensors) is
    built once, not per step."""
    with capture_launches():
        call()[0].backward()
    for leaf in leaves:
        leaf.grad = None
    with capture_launches() as launches, CountOps() as counter:
        loss, _stats = call()
        loss.backward()
    assert all(leaf.grad is not None for leaf in leaves)
    return counter.ops, len(launches)


def _batch(labels: torch.Tensor, targets: PoolTargets | None = None) -> SimpleNamespace:
    return SimpleNamespace(labels=labels, targets=targets)


@pytest.mark.parametrize("topk", [0, 10], ids=["dense", "top-10"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_stored_targets_call_launches_at_most_three_operations(topk, dtype):
    targets = _stored(topk)
    labels = torch.randint(0, CLASSES, (ROWS,))
    logits = torch.randn(ROWS, CLASSES, dtype=dtype, requires_grad=True)
    strategy = _strategy(StoredTargets)
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
