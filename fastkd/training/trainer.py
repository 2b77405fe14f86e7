"""The trainer: one loop for every way of teaching (``fastkd.training.strategy``).

It plans each epoch's rows (``plan``), feeds their images and the strategy's targets to the step
(``batches``; the images checked against the store's, ``store_match``), takes the step, and ends
every epoch with model selection on held-out data (``val_data``; never the test split) and an
atomic checkpoint from which ``resume`` continues bit-exactly (``checkpointing``). The loss is
reduced as a sum over the global batch divided by its size, so one process and N
DistributedDataParallel ranks (torchrun; each rank a disjoint slice of every global batch) take
the same gradient steps. Each epoch also rewrites ``summary.csv`` (timm's per-epoch columns) and
logs TensorBoard scalars when tensorboard is installed (``fastkd.training.summary``); the run
ends with its result and transfer report (``result``).

A step never waits on the host (``fastkd.training.steps``): the kernel writes the gradient
already scaled, a non-finite step is skipped by the fused optimisers on the device, and the loop
reads each step's loss one step late. Labels are checked once, when the run is built; stored
top-k ids as the store reader decodes them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import Progress, TaskID, TextColumn
from torch import Tensor

from fastkd.data import ImageDataset, open_dataset, view_loader
from fastkd.errors import ConfigError
from fastkd.files import write_json
from fastkd.kernels import KDStats
from fastkd.models import ModelSpec, parse_pool
from fastkd.partition import NO_TEACHER
from fastkd.runtime import (
    DistContext,
    autocast,
    in_fast_layout,
    join_job,
    progress_bar,
    resolve_device,
)
from fastkd.training.checkpointing import RunCheckpoints
from fastkd.training.compiled import CompiledLoss
from fastkd.training.config import TrainConfig
from fastkd.training.graphed_step import (
    WARMUP_STEPS,
    CudaGraphs,
    GraphBackend,
    GraphedStep,
    StepOutputs,
    graph_problems,
)
from fastkd.training.learners import (
    ImageStreams,
    add_cosine_schedules,
    check_labels,
    make_learner,
    set_capturable,
)
from fastkd.training.plan import Batch, EpochPlan, EpochPlanner
from fastkd.training.result import TrainResult, finish_run, report_specs
from fastkd.training.run_folder import HISTORY_FILE, prepare_run_folder
from fastkd.training.state import STATE_FILE
from fastkd.training.steps import (
    EpochTally,
    SkipFlag,
    StepRecord,
    StepResult,
    non_finite_error,
    rewind_schedule,
    skipping_step,
)
from fastkd.training.store_match import check_unchanged, open_store
from fastkd.training.strategy import RunContext, build_strategy
from fastkd.training.summary import EpochRecord, EpochSummary, describe_epoch
from fastkd.training.transfer import to_device
from fastkd.training.validation import top1

log = logging.getLogger(__name__)


class ViewsRepeatWarning(UserWarning):
    """More epochs than stored views: a sample meets the same target again."""


class Trainer:
    """Builds a run from a ``TrainConfig`` and trains it; ``fit`` is the whole run.

    The pieces are public for tests and benchmarks: ``plan(epoch)`` (which rows, in which order),
    ``batches(plan)`` (images and targets of each step), ``loss``, ``train_step`` (queues a
    step, returns its record), ``device_step`` (the step's device work, what ``--cuda-graphs``
    replays: ``graphed``), ``read_step`` (reads a record on the host), and ``teaching``,
    the strategy (its target columns, its targets, its loss).
    """

    def __init__(self, cfg: TrainConfig, dist_context: DistContext | None = None) -> None:
        if cfg.student is None and not cfg.joint:
            raise ConfigError("no student: give --student NAME[=CKPT] (or --joint, or --all)")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = dist_context or join_job(self.device)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} must be a multiple of the world size "
                f"{self.dist.world_size} (it is the global batch)"
            )
        problems = graph_problems(cfg, self.device, self.dist.world_size) if cfg.cuda_graphs else []
        if cfg.torch_compile and self.dist.world_size > 1:
            problems.append(
                f"--compile under torchrun (world size {self.dist.world_size}): one fullgraph "
                "of DistributedDataParallel models and the loss is not tested yet; leave out "
                "--compile or train in one process"
            )
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out_dir = cfg.out_dir
        self.dataset = open_dataset(cfg.data, root=cfg.data_root)
        check_labels(self.dataset, cfg.data)
        self.pool_specs = {spec.name: spec for spec in parse_pool(cfg.models)} if cfg.models else {}
        self.reader = None if cfg.store is None else open_store(cfg, self.dataset, self.pool_specs)
        self.streams = ImageStreams()
        torch.manual_seed(cfg.seed)  # initialisation from scratch: the same on every rank
        run = RunContext(cfg, self.device, self.dataset, self.reader, self.pool_specs, self.streams)
        self.teaching, students = build_strategy(run)
        self.learners = [
            make_learner(s, cfg, self.device, self.dist, self.streams) for s in students
        ]
        num_views = self.reader.num_views if self.reader is not None else cfg.num_views
        # With a store, its rows and views: no image header is read, and the images the dump
        # skipped (unreadable) are left out of the plan. Without one, every image's size.
        sizes = self.reader.sizes if self.reader is not None else self.dataset.sizes
        self.skipped = int(self.reader.skipped.sum()) if self.reader is not None else 0
        if self.skipped and self.dist.is_main:
            log.warning(
                "%d of %d samples are left out of training: the dump skipped them (unreadable "
                "images; `fastkd inspect %s` names them)", self.skipped, len(self.dataset),
                cfg.store,
            )  # fmt: skip
        self.planner = EpochPlanner(
            cfg.seed, cfg.batch_size, self.dist, sizes, num_views, cfg.augment, self.reader
        )
        self.steps_per_epoch = self.planner.steps_per_epoch
        if cfg.lr_schedule == "cosine":
            add_cosine_schedules(self.learners, cfg.epochs * self.steps_per_epoch)
        if self.teaching.distils and cfg.epochs > num_views:
            warnings.warn(
                f"{cfg.epochs} epochs over {num_views} view(s) per sample: views and their "
                f"targets repeat from epoch {num_views + 1}, and a student overfits repeated "
                "fixed targets (Beyer et al., CVPR 2022); dump more views or train fewer epochs",
                ViewsRepeatWarning,
                stacklevel=2,
            )
        self.epoch = 0  # epochs completed
        self.step = 0  # global steps completed
        self.history: list[EpochRecord] = []
        self.run_checkpoints = RunCheckpoints(cfg, self.learners, self.device, self.dist)
        self.summary = EpochSummary(self.out_dir, [m.name for m in self.learners])  # summary.csv
        self._skip = SkipFlag(self.device)  # the optimisers' found_inf (steps.SkipFlag)
        self.graphed: GraphedStep | None = None  # --cuda-graphs (use_cuda_graphs)
        self._compiled = (  # --compile: the forward and the loss as one compiled function
            CompiledLoss(self.learners, self.teaching, self.device, cfg.amp)
            if cfg.torch_compile
            else None
        )
        if cfg.cuda_graphs:
            self.use_cuda_graphs()

    # -- the steps --------------------------------------------------------------------------------

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's rows of ``epoch`` (``EpochPlanner.plan``)."""
        return self.planner.plan(epoch)

    def batches(self, plan: EpochPlan) -> Iterator[Batch]:
        """The plan's steps: images rebuilt from the views, with the strategy's targets."""
        local_batch = self.cfg.batch_size // self.dist.world_size
        boxes, flips = self.planner.view_boxes(plan.samples, plan.views)
        workers = {} if self.cfg.num_workers is None else {"num_workers": self.cfg.num_workers}
        loader = view_loader(
            self.dataset,
            plan.samples,
            plan.views,
            boxes,
            flips,
            self.streams.configs,
            batch_size=local_batch,
            backend=self.cfg.backend,
            device=self.device,
            **workers,
        )
        rows = plan.step_rows()
        # The epoch's labels go to the device once; each step's are a slice of them.
        labels = to_device(self.dataset.labels[plan.samples], self.device)
        targets = self.teaching.step_targets(plan)
        for step, (view_batch, step_targets) in enumerate(zip(loader, targets, strict=False)):
            samples = plan.samples[rows[step]]
            if not np.array_equal(view_batch.samples.numpy(), samples):
                raise RuntimeError(
                    f"the view loader returned other rows than planned at step {step} of "
                    f"epoch {plan.epoch + 1} (expected samples {samples[:4].tolist()}...)"
                )
            if self.reader is not None:
                check_unchanged(self.reader, self.dataset, samples, view_batch.file_hashes)
            yield Batch(
                samples=samples,
                views=plan.views[rows[step]],
                labels=labels[rows[step]],
                images=[in_fast_layout(image, self.device) for image in view_batch.images],
                global_rows=plan.global_rows[step],
                targets=step_targets,
            )

    def loss(self, batch: Batch, scale: float = 1.0) -> tuple[Tensor, KDStats | None, list[Tensor]]:
        """The loss summed over the batch's rows times ``scale``, the kernel's per-row
        statistics (None without KD) and the learners' logits (``compiled`` with --compile)."""
        if self._compiled is not None:
            return self._compiled(batch, scale)
        with autocast(self.device, self.cfg.amp):
            logits = [learner.forward(batch.images[learner.stream]) for learner in self.learners]
        loss, stats = self.teaching.loss(logits, batch, scale)
        return loss, stats, logits

    def use_cuda_graphs(
        self, backend: GraphBackend | None = None, warmup: int = WARMUP_STEPS
    ) -> None:
        """Take every full batch's step by CUDA-graph replay after ``warmup`` eager ones
        (``graphed_step``; ``backend``: a stand-in for ``CudaGraphs`` in tests), the optimisers
        made capturable."""
        for learner in self.learners:
            set_capturable(learner.optimizer, True)
        rows = self.cfg.batch_size // self.dist.world_size
        backend = backend or CudaGraphs(self.device)
        self.graphed = GraphedStep(self.device_step, rows, self.cfg.batch_size, backend, warmup)

    def train_step(self, batch: Batch) -> StepRecord:
        """Queue one optimiser step on the global batch; nothing in it waits on the host.

        Returns the step's record (device tensors; ``StepRecord.result`` reads them). A step
        whose loss is not finite on any rank, and every step after it until the host has read
        it, is skipped by the optimisers on the device (``steps.SkipFlag``). With CUDA graphs
        (``use_cuda_graphs``) a full batch's ``device_step`` is a graph's replay.
        """
        step = self.device_step if self.graphed is None else self.graphed.run
        totals, finite_rows, distils = step(batch)
        for learner in self.learners:  # on the host: a graph reads the lr tensor they fill
            if learner.scheduler is not None:
                learner.scheduler.step()
        self.step += 1
        return StepRecord(
            step=self.step,
            epoch=self.epoch + 1,
            samples=batch.samples,
            global_rows=batch.global_rows,
            totals=totals,
            finite_rows=list(finite_rows),
            distils=distils,
        )

    def device_step(self, batch: Batch) -> StepOutputs:
        """The step's device work, all that a CUDA graph captures (``graphed_step``): forward,
        loss, backward, the optimisers (skipping on the device), the record's tensors."""
        for learner in self.learners:
            learner.optimizer.zero_grad(set_to_none=True)
        # This rank's sum / the global batch size, times the world size DDP averages over: the
        # gradient of the global batch's mean loss, the same for one process or many. The
        # kernel writes that gradient already scaled; backward passes it through as it is.
        scale = self.dist.world_size / batch.global_rows
        loss, stats, logits = self.loss(batch, scale)
        loss.backward()
        loss_sum = loss.detach().float() / scale
        taught = torch.zeros_like(loss_sum)
        if stats is not None:
            taught = (stats.chosen != NO_TEACHER).sum().float()
        totals = torch.stack([loss_sum, taught, (~torch.isfinite(loss_sum)).float()])
        if self.dist.enabled:  # NCCL: the stream waits for the sum, the host does not
            dist.all_reduce(totals, async_op=True).wait()
        skip = self._skip.update(totals[2])
        for learner in self.learners:
            skipping_step(learner.optimizer, skip)
        finite_rows = tuple(torch.isfinite(z.detach()).all(dim=1) for z in logits)
        return StepOutputs(totals, finite_rows, stats is not None)

    def read_step(self, record: StepRecord) -> StepResult:
        """Read a queued step on the host (the loop does it one step late). A non-finite step
        raises ``NonFiniteError``, after undoing the host-side advances (step count, schedules)
        of it and of the steps queued after it, which the device skipped."""
        result = record.result()
        if result.non_finite:
            self._raise_non_finite(record)
        return result

    def _raise_non_finite(self, record: StepRecord) -> None:
        """The host has read a non-finite step: undo the host-side advances of it and of the
        step queued after it (both skipped on the device), then stop, naming the step, the
        samples and the culprit."""
        skipped = self.step - record.step + 1
        self.step = record.step - 1
        for learner in self.learners:
            if learner.scheduler is not None:
                rewind_schedule(learner.scheduler, skipped)
        self._skip.reset()
        found = record.culprits([m.name for m in self.learners], self.dataset.keys, self.dist)
        raise non_finite_error(record, found, self.out_dir / STATE_FILE)

    # -- the run ----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs`` epochs (continuing the checkpoint with ``resume``), then report."""
        cfg = self.cfg
        state_path = self.out_dir / STATE_FILE
        resuming = prepare_run_folder(
            self.out_dir,
            self.learners,
            self.pool_specs,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            dist=self.dist,
        )
        if resuming:
            self.load_state(state_path)
        else:
            if self.dist.is_main:
                self.run_checkpoints.save_initial_weights()
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout noise: its own on every rank
        loss_field = TextColumn("loss {task.fields[loss]:.4f}")
        enabled = cfg.progress and self.dist.is_main
        with progress_bar("steps", loss_field, enabled=enabled) as progress:
            task = progress.add_task(
                self._title(),
                total=cfg.epochs * self.steps_per_epoch,
                completed=self.step,
                loss=0.0,
            )
            try:
                while self.epoch < cfg.epochs:
                    record = self._run_epoch(progress, task)
                    self.history.append(record)
                    self._select_and_checkpoint(record)
                    if self.dist.is_main:
                        progress.console.log(describe_epoch(record, cfg.epochs), markup=False)
            finally:
                self.summary.close()
        result = finish_run(
            cfg, self.learners, self.pool_specs, self.history, self.device, self.dist, self.skipped
        )
        self._barrier()
        return result

    def _run_epoch(self, progress: Progress, task: TaskID) -> EpochRecord:
        start = time.perf_counter()
        tally = EpochTally()
        description = f"{self._title()} epoch {self.epoch + 1}/{self.cfg.epochs}"

        def read(record: StepRecord) -> None:  # the host's one look at a step
            result = self.read_step(record)
            tally.add(result, record.global_rows)
            progress.update(task, advance=1, loss=result.loss, description=description)

        pending: StepRecord | None = None
        for batch in self.batches(self.plan(self.epoch)):
            record = self.train_step(batch)
            if pending is not None:  # one step late: the device already has the next step
                read(pending)
            pending = record
        if pending is not None:
            read(pending)
        self.epoch += 1
        seconds = time.perf_counter() - start
        return EpochRecord(
            epoch=self.epoch,
            steps=self.step,
            loss=tally.loss,
            taught=tally.taught,
            val_top1=self.validate(),
            seconds=seconds,
            steps_per_second=tally.steps / seconds,
            lr={m.name: float(m.optimizer.param_groups[0]["lr"]) for m in self.learners},
        )

    def _title(self) -> str:
        return "+".join(learner.name for learner in self.learners)

    @cached_property
    def val_dataset(self) -> ImageDataset:
        return open_dataset(self.cfg.val_data)

    def validate(self) -> dict[str, float]:
        """Top-1 (%) of each trained model on the held-out ``val_data``, the same on every rank:
        each evaluates a disjoint slice (``validation.top1``); rank 0 writes the files."""
        if self.cfg.val_data is None:
            return {}
        return top1(self.learners, self.val_dataset, self.cfg, self.device, self.dist)

    def _select_and_checkpoint(self, record: EpochRecord) -> None:
        """Keep each model's best weights on val, then the history and the run state."""
        self.run_checkpoints.select(record, self.out_dir / STATE_FILE)
        if self.dist.is_main:
            write_json(self.out_dir / HISTORY_FILE, [asdict(r) for r in self.history])
            self.summary.write(self.history)
        self.save_state(self.out_dir / STATE_FILE)

    # -- checkpoint -------------------------------------------------------------------------------

    def save_state(self, path: Path) -> None:
        """Atomically write all ``resume`` needs (``RunCheckpoints.save_state``)."""
        self.run_checkpoints.save_state(path, self.epoch, self.step, self.history)

    def load_state(self, path: Path) -> None:
        """Continue the run in ``path`` (``RunCheckpoints.load_state``)."""
        self.epoch, self.step, self.history = self.run_checkpoints.load_state(path)
        for learner in self.learners:  # the saved lr as this run takes it (graphs or not)
            set_capturable(learner.optimizer, self.graphed is not None)
        if self.graphed is not None:  # new optimiser state tensors: capture them again
            self.graphed.reset()

    # -- report -----------------------------------------------------------------------------------

    def report_specs(self, checkpoints: Mapping[str, Path]) -> tuple[list[ModelSpec], ...]:
        """The report's models: every pool member and student before, the trained ones after."""
        return report_specs(self.learners, self.pool_specs, checkpoints)

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()
