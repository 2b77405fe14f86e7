"""CUDA graphs of a training step (``fastkd train --cuda-graphs``): one launch replays the step.

At small images a step is bound by the host: a resnet18 at 32 px launches hundreds of small
kernels (forward, the loss, backward, the fused optimisers), and the host takes longer to launch
them than the GPU to run them. A CUDA graph records those launches once and replays them with
one call. ``GraphedStep.run`` takes the trainer's step function (``Trainer.device_step``: the
forward passes, the loss, backward, the optimisers, the step's record tensors) and

1. copies each full batch into static buffers (its images per stream, labels, the tensors of
   its stored ``PoolTargets``), allocated at the first one;
2. runs the first ``WARMUP_STEPS`` full batches eagerly on those buffers, on a side stream: lazy
   initialisation (cuBLAS and cuDNN handles and algorithms, the Triton kernels' compilation for
   these very tensors, the optimisers' state, the loss's caches) happens there, outside any
   graph, as torch asks before a capture;
3. captures the step on the buffers at the next full batch (the capture runs nothing, so the
   graph is then replayed for that batch), and replays it for every later one, then copies the
   record's tensors (static outputs the next replay overwrites) out for the loop, which reads
   each step one step late.

A graph replays exactly what it recorded: every number the step reads must be a device tensor
updated in place. The trainer's step already keeps its non-finite flag on the device
(``steps.SkipFlag``, updated in place); the optimisers' learning rate becomes a device tensor
the schedule fills in place (``learners.set_capturable``), else every replay would keep the
lr of the capture; the gradients that the captured backward allocated stay in the graph's memory.

A batch of another shape (the epoch's short last batch, whose divisor ``scale`` differs too) is
run eagerly by the same step function. Padding it to the full shape would need the loss to
ignore the padded rows and a device-tensor scale: a second path through the kernels, for one
step an epoch. Loading a run state (resume) replaces the optimisers' state tensors, so the graph
is dropped (``reset``) and captured again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from fastkd.errors import ConfigError
from fastkd.training.config import TrainConfig
from fastkd.training.plan import Batch

WARMUP_STEPS = 3  # eager steps on a side stream before the capture (torch's examples take 3)
OPTION = "--cuda-graphs"


class StepOutputs(NamedTuple):
    """What a step leaves on the device for its record (``steps.StepRecord``)."""

    totals: Tensor  # [3]: summed loss, rows taught, ranks with a bad loss
    finite_rows: tuple[Tensor, ...]  # per learner, [rows] bool
    distils: bool  # whether the loss taught rows at all (a host fact of the step function)


class GraphBackend(Protocol):
    """How a step is warmed up, captured and replayed: ``CudaGraphs``, or a stand-in in tests."""

    def warmup(self) -> contextlib.AbstractContextManager[None]: ...

    def capture(self, step: Callable[[], StepOutputs]) -> StepOutputs:
        """Record ``step`` and take it once (on the static inputs it reads); its outputs are
        static: each later ``replay`` rewrites them."""
        ...

    def replay(self) -> None: ...


class CudaGraphs:
    """torch's CUDA graphs; the warm-up on a side stream, as torch's capture expects."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def capture(self, step: Callable[[], StepOutputs]) -> StepOutputs:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the stored targets' reader thread waits on CUDA events meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            outputs = step()
        self.graph.replay()
        return outputs

    def replay(self) -> None:
        self.graph.replay()


def graph_problems(cfg: TrainConfig, device: torch.device, world_size: int) -> list[str]:
    """Why ``--cuda-graphs`` cannot run on this device and job (empty: it can); the config
    itself refuses ``--compile`` with it (``TrainConfig``)."""
    problems = []
    if device.type != "cuda":
        problems.append(
            f"{OPTION} captures the training step into a CUDA graph: it needs a CUDA device, "
            f"this run's is {device} (--device {cfg.device}); leave out {OPTION}"
        )
    if world_size > 1:
        problems.append(
            f"{OPTION} runs in one process: under torchrun (world size {world_size}) "
            "DistributedDataParallel's gradient all-reduce is not captured; leave out "
            f"{OPTION} or train on one GPU"
        )
    if os.environ.get("TRITON_INTERPRET") == "1":
        problems.append(
            f"{OPTION} with TRITON_INTERPRET=1: the interpreter runs the loss kernel on the "
            "host, which no graph can record; unset TRITON_INTERPRET"
        )
    return problems


class GraphedStep:
    """A training step taken by CUDA-graph replay for every full batch (module docstring).

    ``step(batch)`` queues one step and returns its outputs; ``rows`` and ``global_rows`` are a
    full batch's (this rank's rows, the global batch's): any other batch runs ``step`` eagerly.
    """

    def __init__(
        self,
        step: Callable[[Batch], StepOutputs],
        rows: int,
        global_rows: int,
        backend: GraphBackend,
        warmup: int = WARMUP_STEPS,
    ) -> None:
        self._step = step
        self.rows = rows
        self.global_rows = global_rows
        self.backend = backend
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        """Forget the graph (and warm up again): after the optimisers' state was replaced."""
        self.warmed = 0
        self._static: Batch | None = None
        self._signature: tuple[Any, ...] | None = None
        self._outputs: StepOutputs | None = None
        self.replays = 0  # steps taken by the graph (its capture's included)
        self.eager = 0  # steps taken eagerly (warm-up and other shapes)

    def run(self, batch: Batch) -> StepOutputs:
        """Take ``batch``'s step: by replay where it has the captured shape, else eagerly."""
        full = len(batch.samples) == self.rows and batch.global_rows == self.global_rows
        signature = batch_signature(batch) if full else None
        if self._static is None and full:  # the buffers the warm-up and the graph read
            self._static, self._signature = static_copy(batch), signature
        elif full and signature == self._signature:
            fill(self._static, batch)
        else:  # the short batch, or a full one of another layout: not the graph's
            self.eager += 1
            return self._step(batch)
        static = self._static
        if self.warmed < self.warmup:  # on the very tensors the capture reads: no new kernel
            self.warmed += 1  # specialisation (alignment, strides) is compiled in the capture
            self.eager += 1
            with self.backend.warmup():
                return self._step(static)
        if self._outputs is None:
            self._outputs = self._capture(static)
        else:
            self.backend.replay()
        self.replays += 1
        totals, finite_rows, distils = self._outputs
        return StepOutputs(totals.clone(), tuple(f.clone() for f in finite_rows), distils)

    def _capture(self, static: Batch) -> StepOutputs:
        """The capture; a step that CUDA refuses to capture (it waits on the host: a model or
        loss reading a value on the CPU) is a ``ConfigError`` naming the option."""
        try:
            return self.backend.capture(lambda: self._step(static))
        except RuntimeError as error:
            if "captur" not in str(error):  # not the capture's own refusal: a bug of the step
                raise
            first = " ".join(str(error).split())[:200]
            raise ConfigError(
                f"{OPTION}: the training step could not be captured into a CUDA graph ({first}); "
                "a step that waits on the host (a model or loss that reads a value on the CPU) "
                f"cannot be replayed; leave out {OPTION}"
            ) from error


def _tensors(batch: Batch) -> Iterator[tuple[str, Tensor]]:
    """The batch's device inputs of the step, by name: images, labels, the targets' tensors."""
    for index, image in enumerate(batch.images):
        yield f"images[{index}]", image
    yield "labels", batch.labels
    if batch.targets is not None:
        for field in dataclasses.fields(batch.targets):
            value = getattr(batch.targets, field.name)
            if isinstance(value, Tensor):
                yield f"targets.{field.name}", value


def batch_signature(batch: Batch) -> tuple[Any, ...]:
    """What a graph fixes of its inputs: each tensor's shape, strides, dtype and device, and
    the targets' other fields (their tail model...)."""
    tensors = tuple(
        (name, tuple(t.shape), t.stride(), t.dtype, t.device) for name, t in _tensors(batch)
    )
    if batch.targets is None:
        return tensors, None
    others = tuple(
        (field.name, getattr(batch.targets, field.name))
        for field in dataclasses.fields(batch.targets)
        if not isinstance(getattr(batch.targets, field.name), Tensor)
    )
    return tensors, others


def static_copy(batch: Batch) -> Batch:
    """The graph's input buffers: a copy of ``batch``'s tensors, layouts kept."""
    targets = batch.targets
    if targets is not None:
        clones = {
            field.name: getattr(targets, field.name).clone()
            for field in dataclasses.fields(targets)
            if isinstance(getattr(targets, field.name), Tensor)
        }
        targets = dataclasses.replace(targets, **clones)
    return dataclasses.replace(
        batch,
        labels=batch.labels.clone(),
        images=[image.clone() for image in batch.images],
        targets=targets,
    )


def fill(static: Batch, batch: Batch) -> None:
    """Copy ``batch``'s tensors into the graph's buffers (device copies, queued in order)."""
    for (_, into), (_, source) in zip(_tensors(static), _tensors(batch), strict=True):
        into.copy_(source, non_blocking=True)
