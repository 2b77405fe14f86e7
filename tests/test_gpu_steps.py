"""Training steps on the GPU never wait on the host: one step of each way of teaching under
``torch.cuda.set_sync_debug_mode("error")``, where any synchronising CUDA call raises.

A tiny run on real data (the digits pool of ``digits_pool.py``: two timm models with different
input sizes and normalisations), dumped to a store on the GPU. For each kind, offline (stored
targets), live teachers and joint Bi-KD, the epoch's batches are made first (the loader and the
target reads are the input pipeline, not the step), one warm-up step compiles the kernel and
fills the caches outside the mode, then one step runs inside it. The step's record is read
afterwards (the one host sync, as the training loop reads it one step late): its loss is finite
and the models moved.

Skipped without CUDA, and when ``TRITON_INTERPRET=1`` (the interpreter copies CUDA tensors to the
host); ``scripts/gpu-check`` runs it with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from fastkd.dump import DumpConfig, run_dump
from fastkd.training import TrainConfig, Trainer

pytest_plugins = ("digits_pool",)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and TRITON_INTERPRET unset or 0 (scripts/gpu-check on a GPU machine)",
)

KINDS = ("offline", "live", "joint")


@pytest.fixture(scope="module")
def gpu_store(digits_small: Path, digit_pool, tmp_path_factory) -> Path:
    """The pool's outputs on 2 views of every image, dumped on the GPU (dense fp16 logits)."""
    return run_dump(
        DumpConfig(
            data=digits_small,
            models=[member.spec for member in digit_pool],
            out=tmp_path_factory.mktemp("gpu_store") / "store.zarr",
            views=2,
            batch_size=32,
            backend="torch",
            device="cuda",
            num_workers=0,
            progress=False,
        )
    )


def train_config(kind: str, digits_small: Path, digit_pool, store: Path, out: Path) -> TrainConfig:
    specs = tuple(member.spec for member in digit_pool)
    common = {
        "data": digits_small,
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-3,
        "out_dir": out,
        "device": "cuda",
        "backend": "torch",
        "num_workers": 0,
        "progress": False,
        "report": False,
    }
    if kind == "offline":  # a member taught by the other's stored targets
        return TrainConfig(student=specs[0], store=store, **common)
    if kind == "live":
        return TrainConfig(student=specs[0], teachers="live", models=specs, **common)
    return TrainConfig(joint=True, models=specs, views=2, **common)


def step_loss(record: object) -> float:
    """The mean loss of a ``train_step`` return: a step record (``result()``), a tensor or a
    number (the Trainer's public API, whichever form it returns)."""
    if hasattr(record, "result"):
        return float(record.result().loss)
    if isinstance(record, torch.Tensor):
        return record.float().mean().item()
    if isinstance(record, tuple):
        return step_loss(record[0])
    return float(record)


@pytest.mark.parametrize("kind", KINDS)
def test_a_training_step_never_waits_on_the_host(
    kind, digits_small, digit_pool, gpu_store, tmp_path
):
    trainer = Trainer(train_config(kind, digits_small, digit_pool, gpu_store, tmp_path / kind))
    batches = list(trainer.batches(trainer.plan(0)))  # the input pipeline, done beforehand
    assert len(batches) >= 2
    trainer.train_step(batches[0])  # warm-up: kernels compiled, caches and allocator filled
    parameters = [p for learner in trainer.learners for p in learner.model.parameters()]
    before = [p.detach().clone() for p in parameters]
    torch.cuda.synchronize()

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        record = trainer.train_step(batches[1])
    finally:
        torch.cuda.set_sync_debug_mode(previous)

    torch.cuda.synchronize()
    assert math.isfinite(step_loss(record))
    # on a GPU the students and their images are channels_last (runtime.fast_memory_format)
    for learner in trainer.learners:
        convs = [m.weight for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(i.is_contiguous(memory_format=torch.channels_last) for i in batches[1].images)
    moved = [not torch.equal(p.detach(), b) for p, b in zip(parameters, before, strict=True)]
    assert any(moved), "the step under the sync check left every parameter as it was"
