"""A run's checkpoints: each model's weights selected on val, and the state ``resume`` reads.

At each epoch's end rank 0 keeps each trained model's best weights on the held-out ``val_data``
(the latest without it) in ``<out_dir>/<name>.pt``, a fastkd checkpoint that
``timm.create_model(arch, checkpoint_path=...)`` also loads (its weights are under
``"state_dict"``); then the run state (``fastkd.training.state``) is written atomically with
every rank's RNG state, from which ``resume`` continues bit-exactly. A student without a
checkpoint keeps its starting weights, so the report can compare it with them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastkd.checkpoints import save_checkpoint
from fastkd.runtime import DistContext
from fastkd.training.config import TrainConfig
from fastkd.training.learners import Learner, spec_text
from fastkd.training.state import (
    damaged_state,
    load_run_state,
    restore_rng,
    rng_state,
    save_run_state,
)
from fastkd.training.summary import EpochRecord


class RunCheckpoints:
    """The trained models' selected weights and the run state, saved and loaded for every rank."""

    def __init__(
        self,
        cfg: TrainConfig,
        learners: list[Learner],
        device: torch.device,
        dist_context: DistContext,
    ) -> None:
        self.cfg = cfg
        self.learners = learners
        self.device = device
        self.dist = dist_context
        self.best: dict[str, float] = {}  # best val top-1 per trained model

    def select(self, record: EpochRecord, state_path: Path) -> None:
        """Keep each model's best weights on val (the latest without val data), rank 0 writing;
        weights that are not finite or exploded stop the run before anything is saved."""
        for learner in self.learners:
            learner.check_weights(record.epoch, state_path)
        if not self.dist.is_main:
            return
        for learner in self.learners:
            score = record.val_top1.get(learner.name)
            if score is not None and score <= self.best.get(learner.name, -math.inf):
                continue
            if score is not None:
                self.best[learner.name] = score
            self._save_weights(learner, self.cfg.out_dir / f"{learner.name}.pt", record)

    def _save_weights(self, learner: Learner, path: Path, record: EpochRecord | None) -> None:
        extra: dict[str, Any] = {"trained_from": spec_text(learner.before)}
        if record is not None:
            extra.update(epoch=record.epoch, step=record.steps, val_top1=record.val_top1)
        save_checkpoint(
            path, learner.model, learner.arch, learner.model_kwargs, learner.data_config, extra
        )

    def save_initial_weights(self) -> None:
        """A student without a checkpoint keeps its starting weights (``initial_weights_path``)."""
        for learner in self.learners:
            if learner.own_start:
                self._save_weights(learner, learner.before.checkpoint, None)

    def save_state(self, path: Path, epoch: int, step: int, history: list[EpochRecord]) -> None:
        """Atomically write all ``resume`` needs: rank 0 writes, with every rank's RNG state."""
        rng = [rng_state(self.device)]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, rng_state(self.device))
        if self.dist.is_main:
            progress = {
                "config": self.cfg.to_dict(),
                "epoch": epoch,
                "step": step,
                "best": dict(self.best),
                "history": [asdict(r) for r in history],
            }
            save_run_state(path, self.learners, progress, rng)
        if self.dist.enabled:
            dist.barrier()

    def load_state(self, path: Path) -> tuple[int, int, list[EpochRecord]]:
        """Continue the run in ``path``: refuse another configuration, restore every state;
        returns the epochs and steps completed and the history."""
        payload = load_run_state(path, self.cfg.to_dict(), self.learners)
        epoch, step = payload["epoch"], payload["step"]
        self.best = dict(payload["best"])
        history = [EpochRecord(**record) for record in payload["history"]]
        rng = payload["rng"]
        if len(rng) != self.dist.world_size:
            warnings.warn(
                f"{path} was written by {len(rng)} rank(s), this run has {self.dist.world_size}: "
                "random states are re-seeded, so dropout noise differs from an unbroken run",
                stacklevel=3,
            )
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1000 * epoch)
            return epoch, step, history
        try:
            restore_rng(rng[self.dist.rank], self.device)
        except (TypeError, ValueError, RuntimeError, KeyError) as error:
            raise damaged_state(path, f"its random states are damaged ({error})") from None
        return epoch, step, history
