"""Ways of teaching: one class each, built once from a ``TrainConfig`` by ``build_strategy``.

A strategy owns what differs between the ways a pool member learns: who the students are, the
target columns (``members``; ``self_index`` where the student's own initial outputs are one),
the targets of each step (read ahead from the store, or none) and the loss. The trainer runs the
same plan, step, checkpoints and selection for all of them:

- ``StoredTargets`` (``teachers="offline"``): the pool's stored targets, partitioned KD loss.
- ``LiveTeachers`` (``teachers="live"``): the baseline that pays for teachers: the pool runs
  forward on the same views every step; its logits become dense targets for the same loss.
- ``CrossEntropyOnly`` (``teachers="none"``): the control with the same steps, and training from
  scratch (as the demo does for its pool).
- ``JointBiKD`` (``joint=True``): Bi-KD of N >= 2 models trained at once, bidirectional kernel.

Plain KD (``mode="plain"``) and label-free partitions (``partition_score="confidence"``) are
options of the partitioned loss, for stored and live teachers alike; a new way of teaching is one
more class here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd.choices import PartitionMode, Reduction, Teachers
from fastkd.data import ImageDataset
from fastkd.errors import ConfigError, StoreMismatchError
from fastkd.kernels import (
    BidirectionalKDConfig,
    KDStats,
    PartitionedKDConfig,
    PoolTargets,
    bidirectional_kd_trusted,
    partitioned_kd_trusted,
)
from fastkd.kernels.partitioned_reference import plain_config, plain_targets
from fastkd.loss_settings import LossSettings
from fastkd.models import LoadedModel, ModelSpec, file_sha256
from fastkd.runtime import autocast, fast_memory_format
from fastkd.store import Expectation, StoreReader
from fastkd.targets import pool_targets, target_columns
from fastkd.training.config import TrainConfig
from fastkd.training.learners import ImageStreams, load_for, load_student
from fastkd.training.plan import Batch, EpochPlan
from fastkd.training.transfer import PinnedRing

PREFETCH_STEPS = 2  # stored-target reads in flight ahead of the step that needs them


@dataclass
class RunContext:
    """What a strategy is built from: the run's configuration, data, store and pool."""

    cfg: TrainConfig
    device: torch.device
    dataset: ImageDataset
    reader: StoreReader | None  # the store, when the run has one (its views, maybe its targets)
    pool: dict[str, ModelSpec]  # --model specs by name
    streams: ImageStreams

    def load(self, spec: ModelSpec, **kwargs: Any) -> LoadedModel:
        return load_for(self.dataset, self.cfg.data, spec, **kwargs)


class TeachingStrategy:
    """One way of teaching; subclasses set ``members`` / ``self_index`` and the loss."""

    distils: ClassVar[bool] = True  # whether rows are taught (KD) at all
    members: list[str]  # the target columns, in order
    self_index: int | None = None  # the student's own column (``fixed`` mode), if any

    def __init__(self, run: RunContext, students: Sequence[LoadedModel]) -> None:
        self.run = run
        self.cfg = run.cfg
        self.members = []
        self._prepare_loss()

    def _prepare_loss(self) -> None:
        """What the loss reads every step, made here (again once the columns are known), as
        plain attributes, not cached properties: a compiled step's trace reads them, and Python
        3.11's cached_property takes a lock Dynamo cannot trace."""
        # The run's loss settings as the loop takes them: summed over the rows (the trainer
        # divides by the global batch through ``scale``).
        self._settings: LossSettings = dataclasses.replace(self.cfg.loss, reduction=Reduction.SUM)
        self._configs: dict[float, Any] = {}  # the loss's config per ``scale`` (loss_config)
        # The config ``plain_targets`` mixes by (its T, the student's own column), or None
        # unless the mode is ``plain``.
        self._plain: PartitionedKDConfig | None = None
        if self.cfg.loss.mode is PartitionMode.PLAIN:
            self._plain = PartitionedKDConfig.of(self._settings, self_index=self.self_index)

    @classmethod
    def students(cls, run: RunContext) -> list[LoadedModel]:
        """The models this way of teaching trains: the configured student."""
        return [load_student(run.cfg, run.dataset)]

    def step_targets(self, plan: EpochPlan) -> Iterator[PoolTargets | None]:
        """The targets of each step of ``plan``, in step order, on the device (None: none)."""
        return itertools.repeat(None)

    def loss(
        self, logits: Sequence[Tensor], batch: Batch, scale: float = 1.0
    ) -> tuple[Tensor, KDStats | None]:
        """The loss summed over the batch's rows times ``scale``, and the kernel's per-row
        statistics. The kernels write its gradient already scaled, for ``loss.backward()`` on
        this loss alone (``grad_output_is_one``): back-propagate nothing derived from it."""
        raise NotImplementedError

    def loss_config(self, scale: float) -> Any:
        """The loss's config at ``scale`` (None without a kernel), made once per scale: the
        run's batches, and its last short one; for the kernels' ``*_trusted`` calls (labels
        were checked when the run was built, stored ids as the reader decoded them). A compiled
        step (``training.compiled``) makes it before its trace, which cannot build a config."""
        config = self._configs.get(scale)
        if config is None:
            config = self._configs[scale] = self._make_config(scale)
        return config

    def _make_config(self, scale: float) -> Any:
        return None


class _PartitionedTeaching(TeachingStrategy):
    """A student taught per row by the pool member the partition rule chooses."""

    def _set_columns(self, pool: Sequence[str], student: str) -> None:
        self.members, self.self_index = target_columns(pool, student, self.cfg.loss.mode)
        self._prepare_loss()  # plain KD's mixture config takes the student's column

    def _partitioned(
        self, logits: Sequence[Tensor], batch: Batch, targets: PoolTargets, scale: float
    ) -> tuple[Tensor, KDStats]:
        return partitioned_kd_trusted(logits[0], batch.labels, targets, self.loss_config(scale))

    def _make_config(self, scale: float) -> PartitionedKDConfig:
        """The loss's config; ``plain`` as the kernel runs it (``plain_config``): the targets
        are already the teachers' mixture, made with them (``plain_targets``), not in the loss."""
        config = PartitionedKDConfig.of(
            self._settings, self_index=self.self_index, scale=scale, grad_output_is_one=True
        )
        return plain_config(config)


class StoredTargets(_PartitionedTeaching):
    """The pool's stored targets (``fastkd dump``); no teacher runs."""

    def __init__(self, run: RunContext, students: Sequence[LoadedModel]) -> None:
        super().__init__(run, students)
        reader, (student,) = run.reader, students
        name = student.spec.name
        if name in reader.model_names:
            self._check_student_in_store(student)
        elif self.cfg.loss.mode is PartitionMode.FIXED:
            raise ConfigError(
                f"partition mode 'fixed' needs the student's initial outputs in the store, but "
                f"{name!r} is not in its pool {reader.model_names}; dump the student with the "
                "pool (or name it as its pool member), or use --mode live|best|plain"
            )
        self._set_columns(list(self.cfg.members) or reader.model_names, name)

    def _check_student_in_store(self, student: LoadedModel) -> None:
        """A student that is a pool member: its stored outputs must be its own (weights, pixels)."""
        name, reader = student.spec.name, self.run.reader
        manifest = reader.manifest
        own = Expectation(
            checkpoints={name: student.sha256}, data_configs={name: student.data_config}
        )
        problems = own.differences(manifest)
        if manifest.model(name).arch != student.spec.arch:
            problems.insert(
                0,
                f"models[{name}].arch: store has {manifest.model(name).arch!r}, "
                f"the student is {student.spec.arch!r}",
            )
        if problems:
            raise StoreMismatchError(
                reader.path,
                problems,
                f"the store's {name!r} is another model than the student; name the student "
                "differently (alias:ARCH=CKPT) to train it as an outsider",
            )

    def read(
        self,
        samples: np.ndarray,
        views: np.ndarray,
        ring: PinnedRing | None = None,
        slot: int = 0,
    ) -> PoolTargets:
        """The store's targets of the columns for rows (samples[i], views[i]), on the host (in
        ``ring``'s pinned buffers of ``slot``, when given)."""
        rows = self.run.reader.read_pool(self.members, samples, views)
        fill = None if ring is None else functools.partial(ring.fill, slot)
        mixing = None
        if self._plain is not None:  # plain KD: the teachers' mixture, made here on the host
            labels = torch.from_numpy(self.run.dataset.labels[samples].astype(np.int64))
            dataset_classes = self.run.dataset.num_classes
            mixing = functools.partial(
                plain_targets, labels=labels, num_classes=dataset_classes, config=self._plain
            )
        return pool_targets(rows, fill, self.cfg.loss.temperature, mixing)

    def step_targets(self, plan: EpochPlan) -> Iterator[PoolTargets]:
        """Each step's stored rows, read ``PREFETCH_STEPS`` ahead in a thread into a ring of
        ``PREFETCH_STEPS + 1`` pinned buffers (CUDA), then sent without the host waiting.

        Step s fills slot s % (P + 1); that slot's last copy (step s - P - 1's) was queued, and
        its event recorded, before step s's read is submitted, and the read waits on the event
        before it overwrites the slot (``PinnedRing``). The ring is this call's own, so two
        epochs' iterators never share a buffer.
        """
        rows = plan.step_rows()
        device = self.run.device
        slots = PREFETCH_STEPS + 1
        ring = PinnedRing(slots, device)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-targets") as reads:
            ahead: deque[Future[PoolTargets]] = deque()
            for step in range(len(rows) + PREFETCH_STEPS):
                if step < len(rows):
                    part = rows[step]
                    samples, views = plan.samples[part], plan.views[part]
                    ahead.append(reads.submit(self.read, samples, views, ring, step % slots))
                if step >= PREFETCH_STEPS:
                    targets = ahead.popleft().result().to(device, non_blocking=True)
                    ring.sent((step - PREFETCH_STEPS) % slots)
                    yield targets

    def loss(
        self, logits: Sequence[Tensor], batch: Batch, scale: float = 1.0
    ) -> tuple[Tensor, KDStats]:
        return self._partitioned(logits, batch, batch.targets, scale)


@dataclass
class LiveTeacher:
    """A frozen pool member run forward on every batch."""

    name: str
    model: torch.nn.Module
    stream: int


class LiveTeachers(_PartitionedTeaching):
    """The pool's models, frozen, run forward every step. In ``fixed`` mode a frozen copy of the
    student's initial weights is the last column (what offline reads from the store)."""

    def __init__(self, run: RunContext, students: Sequence[LoadedModel]) -> None:
        super().__init__(run, students)
        (student,) = students
        name, pool = student.spec.name, run.pool
        unknown = sorted(set(self.cfg.members) - set(pool))
        if unknown:
            raise ConfigError(f"--member {unknown} is not in the pool {list(pool)}")
        own = pool.get(name)
        if own is not None and own.checkpoint and file_sha256(own.checkpoint) != student.sha256:
            raise ConfigError(f"--model {name} has other weights than the student {name!r}")
        self._set_columns(list(self.cfg.members) or list(pool), name)
        self.teachers: list[LiveTeacher] = []
        for column in self.members:
            loaded = student if column == name else run.load(pool[column])
            # The student's column is a frozen copy of its initial weights, never the learner.
            model = copy.deepcopy(loaded.model) if column == name else loaded.model
            model = model.to(run.device, memory_format=fast_memory_format(run.device))
            model = model.eval().requires_grad_(False)
            self.teachers.append(LiveTeacher(column, model, run.streams.index(loaded.data_config)))

    def live_targets(self, batch: Batch) -> PoolTargets:
        """Dense targets from the live teachers' logits on the batch's views."""
        with torch.no_grad(), autocast(self.run.device, self.cfg.amp):
            logits = [t.model(batch.images[t.stream]) for t in self.teachers]
        # No log-sum-exp at T here (PoolTargets.with_lse): for live logits it would read every
        # member's row on the device, more than pass 1's read of the one chosen teacher.
        targets = PoolTargets.from_logits(torch.stack(logits, dim=1).float(), batch.labels)
        if self._plain is None:
            return targets
        return plain_targets(targets, batch.labels, logits[0].shape[1], self._plain)

    def loss(
        self, logits: Sequence[Tensor], batch: Batch, scale: float = 1.0
    ) -> tuple[Tensor, KDStats]:
        return self._partitioned(logits, batch, self.live_targets(batch), scale)


class CrossEntropyOnly(TeachingStrategy):
    """No teacher: cross-entropy on the labels (the control, and training from scratch)."""

    distils = False

    def loss(
        self, logits: Sequence[Tensor], batch: Batch, scale: float = 1.0
    ) -> tuple[Tensor, None]:
        """The same math as the kernels' ``scale``; the gradient is autograd's."""
        loss = F.cross_entropy(logits[0].float(), batch.labels, reduction="sum")
        return (loss if scale == 1.0 else loss * scale), None


class JointBiKD(TeachingStrategy):
    """Bi-KD: every ``--model`` trains at once; per row the model more confident on the true
    class teaches the other(s) through the bidirectional kernel."""

    @classmethod
    def students(cls, run: RunContext) -> list[LoadedModel]:
        # joint: every model is a student, at the run's input size like the others
        return [run.load(spec, input_size=run.cfg.input_size) for spec in run.pool.values()]

    def loss(
        self, logits: Sequence[Tensor], batch: Batch, scale: float = 1.0
    ) -> tuple[Tensor, KDStats]:
        return bidirectional_kd_trusted(list(logits), batch.labels, self.loss_config(scale))

    def _make_config(self, scale: float) -> BidirectionalKDConfig:
        return BidirectionalKDConfig.of(self._settings, scale=scale, grad_output_is_one=True)


def strategy_class(cfg: TrainConfig) -> type[TeachingStrategy]:
    """The way of teaching ``cfg`` asks for."""
    if cfg.joint:
        return JointBiKD
    return {
        Teachers.OFFLINE: StoredTargets,
        Teachers.LIVE: LiveTeachers,
        Teachers.NONE: CrossEntropyOnly,
    }[cfg.teachers]


def build_strategy(run: RunContext) -> tuple[TeachingStrategy, list[LoadedModel]]:
    """The run's strategy and the students it trains (loaded, not yet on the device)."""
    kind = strategy_class(run.cfg)
    students = kind.students(run)
    return kind(run, students), students
