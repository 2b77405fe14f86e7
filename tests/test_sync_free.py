"""A training step never waits on the host, and a non-finite step changes nothing.

On CUDA, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, a truth test, ``int()`` / ``float()`` / an index, ``torch.equal`` and its kin) waits
for the device. These tests forbid all of them while ``Trainer.train_step`` runs on a prepared batch
(offline, live teachers, joint Bi-KD, cross-entropy only), on CPU, where the same Python runs. The
Triton interpreter, the CPU stand-in for a kernel launch, may read its arguments: a GPU launch
does not.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from training_pool import config, make_pool

from fastkd.errors import NonFiniteError
from fastkd.training import Trainer

HOST_READS = (  # methods of torch.Tensor
    *("item", "tolist", "cpu", "numpy", "__array__", "equal", "allclose", "is_nonzero"),
    *("__bool__", "__int__", "__float__", "__index__"),
)
HOST_READ_FUNCTIONS = ("equal", "allclose", "is_nonzero")  # of torch: each returns a bool


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("sync-pool"))


def _forbidden(name: str, original: Callable) -> Callable:
    def guarded(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("triton."):  # the interpreter running a kernel on CPU
            return original(self, *args, **kwargs)
        raise AssertionError(f"torch.Tensor.{name} on the step path: a host sync on CUDA")

    return guarded


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Every host read of a tensor's value raises, for the ``with`` block."""
    originals = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in HOST_READS]
    originals += [(torch, name, getattr(torch, name)) for name in HOST_READ_FUNCTIONS]
    try:
        for owner, name, original in originals:
            setattr(owner, name, _forbidden(name, original))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def test_the_guard_catches_every_host_read():
    t = torch.ones(2)
    reads = [
        lambda: t[0].item(),
        lambda: t.tolist(),
        lambda: t.cpu(),
        lambda: t.numpy(),
        lambda: bool(t[0]),
        lambda: int(t[0]),
        lambda: float(t[0]),
        lambda: [0, 1][t.long()[0]],
        lambda: t.sum() > 0 and None,
        lambda: np.asarray(t),
        lambda: torch.equal(t, t),
        lambda: t.allclose(t),
    ]
    with no_host_reads():
        for read in reads:
            with pytest.raises(AssertionError, match="host sync"):
                read()
    assert t.tolist() == [1.0, 1.0]  # restored


ARMS = {  # every way of teaching, with both optimisers and the per-step schedule between them
    "offline": {"lr_schedule": "cosine"},
    "live": {"teachers": "live", "optimizer": "sgd", "lr": 1e-2},
    "joint": {"joint": True, "student": None, "store": None, "views": 2},
    "none": {"teachers": "none", "store": None, "models": (), "optimizer": "sgd"},
}


@pytest.mark.parametrize("arm", ARMS)
def test_a_training_step_reads_nothing_on_the_host(pool, tmp_path, arm):
    trainer = Trainer(config(pool, tmp_path, **ARMS[arm]))
    batch = next(trainer.batches(trainer.plan(0)))
    before = [p.detach().clone() for p in trainer.learners[0].model.parameters()]
    trainer.train_step(batch)  # the first step allocates the optimisers' state
    with no_host_reads():
        record = trainer.train_step(batch)
    result = trainer.read_step(record)  # the loop's one read, one step late
    assert trainer.step == 2 and record.step == 2 and record.epoch == 1
    assert result.loss > 0 and not result.non_finite
    assert (result.taught >= 0) if arm != "none" else result.taught != result.taught  # nan
    after = list(trainer.learners[0].model.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, after, strict=True))


class _NaNFrom(torch.nn.Module):
    """The wrapped model's logits, with row 2 NaN while ``bad`` is set."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.bad = model, False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(images)
        return logits.index_fill(0, torch.tensor([2]), float("nan")) if self.bad else logits


def _state(trainer: Trainer) -> dict:
    learner = trainer.learners[0]
    return {
        "params": {k: v.clone() for k, v in learner.model.state_dict().items()},
        "optimizer": {
            index: {k: v.clone() for k, v in state.items()}
            for index, state in learner.optimizer.state_dict()["state"].items()
        },
        "lr": [group["lr"] for group in learner.optimizer.param_groups],
        "schedule": learner.scheduler.last_epoch,
        "step": trainer.step,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["lr"] == b["lr"] and a["schedule"] == b["schedule"] and a["step"] == b["step"]
    for key, tensor in a["params"].items():
        assert torch.equal(tensor, b["params"][key]), key
    for index, state in a["optimizer"].items():
        for key, tensor in state.items():  # moments, momentum buffers, Adam's step count
            assert torch.equal(tensor, b["optimizer"][index][key]), (index, key)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN inside the kernel
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_non_finite_step_and_the_one_queued_after_it_change_nothing(pool, tmp_path, optimizer):
    cfg = config(pool, tmp_path, optimizer=optimizer, lr_schedule="cosine", epochs=2)
    trainer = Trainer(cfg)
    nan = _NaNFrom(trainer.learners[0].model)
    trainer.learners[0].forward = nan
    batches = trainer.batches(trainer.plan(0))
    batch = next(batches)
    trainer.read_step(trainer.train_step(batch))
    saved = _state(trainer)

    nan.bad = True
    bad = trainer.train_step(batch)  # skipped on the device
    nan.bad = False
    trainer.train_step(next(batches))  # queued before the host reads ``bad``: skipped too
    with pytest.raises(NonFiniteError, match=r"step 2 \(epoch 1\): NaN/inf logits of 's'"):
        trainer.read_step(bad)
    _assert_same(_state(trainer), saved)  # as if neither step had been taken

    trainer.read_step(trainer.train_step(batch))  # the flag is down again: this one counts
    moved = _state(trainer)
    assert moved["step"] == 2 and moved["schedule"] == 2
    assert not torch.equal(moved["params"]["head.weight"], saved["params"]["head.weight"])


def test_ranks_share_validation(pool, tmp_path, monkeypatch):
    """Each rank evaluates its own slice; the counts it would all-reduce add up to one process's
    figures (the collective itself is test_ddp's)."""
    from fastkd.runtime import DistContext
    from fastkd.training import validation

    cfg = config(pool, tmp_path, val_data=pool.val)
    one = Trainer(cfg).validate()
    sizes = [len(validation.rank_slice(40, DistContext(rank, 3, rank))) for rank in range(3)]
    assert sizes == [14, 13, 13]
    counts = []
    for rank in range(3):
        trainer = Trainer(dataclasses.replace(cfg))
        trainer.dist = DistContext(rank, 3, rank)
        monkeypatch.setattr(validation.dist, "all_reduce", lambda t: counts.append(t.clone()))
        trainer.validate()
    total = sum(int(c[0]) for c in counts)
    assert one["s"] == pytest.approx(100.0 * total / 40)
