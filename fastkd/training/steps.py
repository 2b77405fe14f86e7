"""A training step's outcome, kept on the device until the loop reads it one step late.

``Trainer.train_step`` queues a step and returns its ``StepRecord``: device tensors (the global
batch's summed loss and taught rows and a non-finite flag, all-reduced across ranks; this rank's
per-learner per-row finite masks) and the host facts needed to name a culprit. Nothing in a step
waits on the host. The epoch loop reads a record (``StepRecord.result``, the one host sync)
after the next step has been queued, and the last one at the end of the epoch.

A non-finite step must not move the models, yet nobody looks at its loss before the optimiser
runs: the optimisers are fused and take a device flag, ``found_inf`` (as GradScaler uses them),
which skips the update, the moments and the step count on the device. ``SkipFlag`` makes that
flag sticky, so the step queued after a non-finite one is skipped too; when the host then reads
the bad record it raises, and ``rewind_schedule`` undoes the host-side schedule's advances of
the skipped steps, leaving every learner as it was before the bad step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fastkd.errors import NonFiniteError
from fastkd.runtime import DistContext


@dataclass
class StepResult:
    """What the host reads of a step: the global batch's mean loss and share of rows taught."""

    loss: float
    taught: float  # nan without KD
    non_finite: bool


@dataclass
class StepRecord:
    """One queued step: device tensors until ``result`` reads them."""

    step: int  # the global step number, 1-based
    epoch: int  # 1-based
    samples: np.ndarray  # this rank's rows (indices into the data set), in batch order
    global_rows: int
    totals: Tensor  # [3] fp32 over all ranks: summed loss, rows taught, ranks with a bad loss
    finite_rows: list[Tensor]  # per learner, [rows] bool: this rank's rows with finite logits
    distils: bool  # whether rows are taught at all (else ``taught`` is nan)

    @property
    def loss_sum(self) -> Tensor:
        return self.totals[0]

    @property
    def taught(self) -> Tensor:
        return self.totals[1]

    @property
    def non_finite(self) -> Tensor:
        return self.totals[2]

    def result(self) -> StepResult:
        """Read the step on the host: waits for this step's work only."""
        loss_sum, taught, non_finite = self.totals.tolist()
        return StepResult(
            loss=loss_sum / self.global_rows,
            taught=taught / self.global_rows if self.distils else math.nan,
            non_finite=non_finite > 0,
        )

    def culprits(
        self, names: Sequence[str], keys: Sequence[str], ranks: DistContext, limit: int = 8
    ) -> list[str]:
        """The lines naming a non-finite step's culprits: per rank (gathered from all of them,
        a collective), each learner's samples with NaN/inf logits, or, if every logit was
        finite, the batch's first samples (then the targets were bad)."""
        found = []
        for name, finite in zip(names, self.finite_rows, strict=True):
            bad = np.flatnonzero(~finite.cpu().numpy())
            if bad.size:
                culprits = [keys[self.samples[row]] for row in bad[:limit]]
                found.append(f"NaN/inf logits of {name!r} on samples {culprits}")
        if not found:
            first = [keys[sample] for sample in self.samples[:limit]]
            found.append(f"NaN/inf targets (the logits are finite) among samples {first}")
        if not ranks.enabled:
            return found
        everywhere: list[list[str] | None] = [None] * ranks.world_size
        dist.all_gather_object(everywhere, found)
        return [f"rank {rank}: {line}" for rank, lines in enumerate(everywhere) for line in lines]


@dataclass
class EpochTally:
    """The host's sums over an epoch's steps, as their records are read."""

    loss_sum: float = 0.0
    taught_sum: float = 0.0
    rows: int = 0
    steps: int = 0

    def add(self, result: StepResult, global_rows: int) -> None:
        self.loss_sum += result.loss * global_rows
        self.taught_sum += result.taught * global_rows
        self.rows += global_rows
        self.steps += 1

    @property
    def loss(self) -> float:
        """The mean training loss over the epoch's rows."""
        return self.loss_sum / max(self.rows, 1)

    @property
    def taught(self) -> float:
        """The share of the epoch's rows that had a KD target (nan without KD)."""
        return self.taught_sum / max(self.rows, 1)


def non_finite_error(record: StepRecord, found: Sequence[str], state: Path) -> NonFiniteError:
    """The error that stops a run at a non-finite step: the step, the culprits, the checkpoint."""
    kept = f"the last checkpoint {state} is kept" if state.exists() else "no checkpoint yet"
    return NonFiniteError(
        f"non-finite loss at step {record.step} (epoch {record.epoch}): "
        + "; ".join(found)
        + f". The optimisers skipped that step on the device, no parameter moved; {kept}."
    )


class SkipFlag:
    """The optimisers' ``found_inf``: 1.0 on the device from a non-finite step on, until reset.

    It must be exactly 0 or 1: fused Adam subtracts it from the step count it has just added 1
    to. Sticky, because the step after a bad one is queued before the host sees the bad one.
    One tensor, updated in place: a CUDA graph of the step reads and writes the one it captured.
    """

    def __init__(self, device: torch.device) -> None:
        self.value = torch.zeros((), device=device)

    def update(self, non_finite: Tensor) -> Tensor:
        """Raise the flag if ``non_finite`` (a count of ranks with a bad loss) is positive."""
        torch.maximum(self.value, (non_finite > 0).float(), out=self.value)
        return self.value

    def reset(self) -> None:
        self.value.zero_()


def skipping_step(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()`` that changes nothing where ``found_inf`` is 1 (fused optimisers)."""
    optimizer.found_inf = found_inf
    optimizer.step()


def rewind_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Undo ``steps`` advances of a closed-form schedule (LambdaLR: lr = base lr x f(step)):
    step back one more and step once, which recomputes and sets the lr of that step."""
    scheduler.last_epoch -= steps + 1
    scheduler.step()


EXPLODED_NORM_RATIO = 1e3  # a norm that grew more than this many times (from >= 1): exploded


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all the model's parameters, in fp32 (one host sync: once an epoch)."""
    squares = [p.detach().float().pow(2).sum() for p in model.parameters()]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def exploded_weights_error(
    name: str, norm: float, start: float, epoch: int, state: Path
) -> NonFiniteError | None:
    """Why a model's weights after ``epoch`` must not be saved: not finite, or their norm grew
    more than ``EXPLODED_NORM_RATIO`` times what it was before training (a learning rate far
    too high moves weights by about the rate itself every step, e.g. --lr 1e30); None if not."""
    if math.isfinite(norm) and norm <= EXPLODED_NORM_RATIO * max(start, 1.0):
        return None
    kept = f"the last checkpoint {state} is kept" if state.exists() else "no checkpoint yet"
    what = (
        f"exploded in epoch {epoch} (norm {norm:.3g}, {norm / max(start, 1e-12):.3g} times "
        "their norm before training)"
        if math.isfinite(norm)
        else f"are not finite after epoch {epoch}"
    )
    return NonFiniteError(
        f"the weights of {name!r} {what}: they are not saved ({kept}). Lower the learning "
        "rate (--lr) and start over (--overwrite)"
    )
