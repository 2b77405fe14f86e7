"""``fastkd train``: one training loop for every way a pool member learns.

Configurations of the same loop (``TrainConfig``):

- ``teachers="offline"``: the student learns from the stored targets of the pool (``fastkd dump``)
  with the partitioned KD loss; no teacher runs. Partition ``mode`` as in ``fastkd.partition``:
  ``live`` (Bi-KD against the current student), ``fixed`` (KL+DP: the student's stored initial
  outputs are the fallback target) or ``all`` (plain KD from the best teacher).
- ``teachers="live"``: the baseline that pays for live teachers: the pool's models run forward on
  the same views every step; their logits become dense ``PoolTargets`` for the same loss.
- ``joint=True``: Bi-KD of N >= 2 models trained at once with the bidirectional kernel.
- ``teachers="none"``: cross-entropy only: the control with the same steps, and training from
  scratch (no checkpoint, ``pretrained=False``, ``model_kwargs``) as the demo does for its pool.
- ``train_all``: every pool member in turn is the student of the others (role-agnostic).

Each epoch the sample order and each sample's view come from the counter RNG
(``fastkd.views.epoch_order`` / ``epoch_views``), so a (sample, view) row is the same whatever
the batch size or world size; its image is rebuilt from the crop box and flip of that view (the
store's, or ``view_params`` without a store) by ``fastkd.data.view_loader``, and its targets are
the store's rows for exactly that (sample, view). The loss is reduced as a sum over the global
batch divided by its size, so one process and N DistributedDataParallel ranks (torchrun; each
rank a disjoint slice of every global batch) take the same gradient steps.

Every epoch ends with model selection on held-out data (``val_data``; never the test split) and
an atomic checkpoint (``state.pt``: models, optimizers, schedulers, RNG states, epoch, step, best
score) from which ``resume`` continues bit-exactly. The selected weights of each trained model go
to ``<out_dir>/<name>.pt`` as a fastkd checkpoint; the transfer report (``fastkd.metrics``) to
``report.json`` / ``report.png``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import Tensor, nn

from fastkd.data import ImageDataset, open_dataset, view_loader
from fastkd.files import atomic_torch_save, write_json
from fastkd.kernels import KDStats, PoolTargets, bidirectional_kd_loss, partitioned_kd_loss
from fastkd.metrics import (
    TransferReport,
    autocast,
    evaluate,
    transfer_from_checkpoints,
)
from fastkd.models import (
    LoadedModel,
    ModelSpec,
    file_sha256,
    json_data_config,
    load_model,
    parse_pool,
    save_checkpoint,
)
from fastkd.partition import NO_TEACHER, PartitionMode
from fastkd.store import Expectation, StoreMismatchError, StoreReader
from fastkd.views import AugmentConfig, epoch_order, epoch_views, view_params

STATE_FILE = "state.pt"
HISTORY_FILE = "history.json"
REPORT_STEM = "report"
PREFETCH_STEPS = 2  # stored-target reads in flight ahead of the step that needs them
DEFAULT_LR = {"adam": 1e-6, "sgd": 1e-4}  # Bi-KD (Adam) and KL+DP (SGD) on pretrained models
# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "device", "progress", "num_workers", "backend", "report", "eval_data"}
)


class Teachers(str, Enum):
    """Where the KD targets come from."""

    OFFLINE = "offline"  # the store
    LIVE = "live"  # the pool's models, run forward every step
    NONE = "none"  # no KD: cross-entropy only


class ViewsRepeatWarning(UserWarning):
    """More epochs than stored views: a sample meets the same target again."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf stopped training; the message names the step and the samples."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; JSON-able, stored with the run's checkpoint.

    Optimiser defaults follow the references for fine-tuning pretrained models: Adam lr 1e-6, wd
    1e-5 (Bi-KD); with ``optimizer="sgd"`` lr 1e-4, momentum 0.9 (KL+DP). Short runs on small data
    usually want a larger lr; training from scratch needs one (e.g. Adam 1e-3).
    """

    data: Path  # training images: image folder or file list (fastkd.data.open_dataset)
    data_root: Path | None = None  # root of a file list's paths (default: the list's folder)
    student: str | None = (
        None  # [alias:]ARCH[=CKPT], its name its key in the store (train_all: None)
    )
    store: Path | None = None  # stored targets (teachers="offline"); optional for the others
    models: tuple[str, ...] = ()  # pool member specs with checkpoints: live / joint / train_all
    members: tuple[str, ...] = ()  # store members that teach (default: all of them)
    teachers: Teachers = Teachers.OFFLINE
    mode: PartitionMode = PartitionMode.LIVE
    joint: bool = False  # Bi-KD of all ``models`` at once (live, bidirectional kernel)
    epochs: int = 10
    batch_size: int = 128  # global: split across DDP ranks
    optimizer: str = "adam"  # adam | sgd
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    weight_decay: float = 1e-5
    momentum: float = 0.9  # SGD only
    lr_schedule: str = "constant"  # constant | cosine (per step, to 0 at the last epoch)
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    stop_grad: bool = True  # joint: the teaching side gets no KD gradient (standard KD)
    seed: int = 0  # sample order, view choice, torch init; views without a store
    views: int = 1  # without a store: views per sample (view 0 is the eval view)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # without a store
    pretrained: bool = True  # student without checkpoint: timm's weights; False: from scratch
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs
    input_size: int | None = None  # override the student's data-config image size
    val_data: Path | None = None  # held out from the training data: model selection
    eval_data: Path | None = None  # the final report's data (default: val_data)
    out_dir: Path = Path("runs/train")
    resume: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK if available, else cpu
    amp: bool = True  # bf16 autocast on GPU
    backend: str = "auto"  # view_loader backend: auto | dali | torch
    num_workers: int | None = None
    progress: bool = True
    report: bool = True  # transfer report at the end (needs eval_data or val_data)

    def __post_init__(self) -> None:
        for name in ("data", "data_root", "store", "val_data", "eval_data", "out_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        self.teachers = Teachers(self.teachers)
        self.mode = PartitionMode(self.mode)
        self.models = tuple(self.models)
        self.members = tuple(self.members)
        if isinstance(self.augment, Mapping):
            self.augment = AugmentConfig.from_dict(self.augment)
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.views < 1:
            problems.append(
                f"epochs, batch_size and views must be >= 1, got "
                f"{self.epochs}, {self.batch_size}, {self.views}"
            )
        if self.optimizer not in DEFAULT_LR:
            problems.append(
                f"optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}"
            )
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            problems.append(f"temperature must be positive, got {self.temperature}")
        if self.joint and len(self.models) < 2:
            problems.append("joint training needs at least 2 models (--model NAME=CKPT each)")
        if self.teachers is Teachers.OFFLINE and not self.joint and self.store is None:
            problems.append("offline teachers need a store (--store), or use --teachers live|none")
        if self.teachers is Teachers.LIVE and not self.joint and not self.models:
            problems.append("live teachers need the pool's checkpoints (--model NAME=CKPT)")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: paths as strings, enums as values."""
        return json.loads(json.dumps(asdict(self), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistContext:
    """Join the torchrun job named by RANK / WORLD_SIZE / LOCAL_RANK (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


# ----------------------------------------------------------------------------------------------
# Models in a run


@dataclass
class Learner:
    """A model being trained, with its optimiser and the image stream it reads."""

    name: str
    arch: str
    model: nn.Module  # unwrapped
    forward: nn.Module  # ``model`` or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    data_config: dict[str, Any]
    model_kwargs: dict[str, Any]
    stream: int  # which of the view loader's image streams (one per distinct data config)
    before: ModelSpec  # its weights before training, for the report


@dataclass
class LiveTeacher:
    """A frozen pool member run forward on every batch (``teachers="live"``)."""

    name: str
    model: nn.Module
    stream: int


@dataclass
class Batch:
    """One step's rows on this rank: images per data config, labels, targets (offline)."""

    samples: np.ndarray
    views: np.ndarray
    labels: Tensor
    images: list[Tensor]  # one [b, 3, H, W] per data config, on the device
    global_rows: int  # rows in the step's global batch, over all ranks
    targets: PoolTargets | None = None  # offline teachers: the store's rows of these views


@dataclass
class EpochPlan:
    """This rank's rows of one epoch, in step order."""

    epoch: int
    samples: np.ndarray
    views: np.ndarray
    rows_per_step: list[int]  # this rank's rows in each step
    global_rows: list[int]  # the global batch size of each step


@dataclass
class EpochRecord:
    epoch: int  # 1-based: epochs completed
    steps: int  # global steps completed
    loss: float  # mean training loss over the epoch's rows
    taught: float  # share of rows that had a KD target (nan without KD)
    val_top1: dict[str, float]  # per trained model; empty without val_data
    seconds: float
    steps_per_second: float


@dataclass
class TrainResult:
    out_dir: Path
    checkpoints: dict[str, Path]  # trained model name -> selected weights (fastkd checkpoint)
    state: Path  # resumable run state
    history: list[EpochRecord]
    report: TransferReport | None = None  # with eval_data or val_data


def spec_text(spec: ModelSpec) -> str:
    """The ``alias:ARCH[=CKPT]`` text that parses back to ``spec`` (name kept)."""
    text = f"{spec.name}:{spec.arch}"
    return f"{text}={spec.checkpoint}" if spec.checkpoint is not None else text


# ----------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds a run from a ``TrainConfig`` and trains it; ``fit`` is the whole run.

    The pieces are public for tests and benchmarks: ``plan(epoch)`` (which rows, in which order),
    ``batches(plan)`` (images and targets of each step), ``stored_targets``, ``train_step``.
    """

    def __init__(self, cfg: TrainConfig, dist_context: DistContext | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = dist_context or init_distributed(self.device.type)
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of the world size "
                f"{self.dist.world_size} (it is the global batch)"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out_dir = cfg.out_dir
        self.dataset = open_dataset(cfg.data, root=cfg.data_root)
        self.pool_specs = {spec.name: spec for spec in parse_pool(cfg.models)} if cfg.models else {}
        self.reader: StoreReader | None = None
        self.members: list[str] = []  # the PoolTargets columns, in order
        self.self_index: int | None = None  # the student's column, if it is a pool member
        self.teachers: list[LiveTeacher] = []
        self._data_configs: list[dict[str, Any]] = []  # one view-loader image stream each

        if cfg.student is None and not cfg.joint:
            raise ValueError("no student: give --student NAME[=CKPT] (or --joint, or --all)")
        torch.manual_seed(cfg.seed)  # initialisation from scratch: the same on every rank
        if cfg.joint:
            loaded = [self._load(spec) for spec in self.pool_specs.values()]
        else:
            loaded = [self._load_student()]
        if cfg.store is not None:
            self._open_store(None if cfg.joint else loaded[0])
        if cfg.teachers is Teachers.LIVE and not cfg.joint:
            self._build_live_teachers(loaded[0])
        self.learners = [self._make_learner(model) for model in loaded]

        self.num_views = self.reader.num_views if self.reader is not None else cfg.views
        self.steps_per_epoch = len(self._global_batches(self._usable_order(0)))
        self._make_schedulers()
        distils = cfg.joint or cfg.teachers is not Teachers.NONE
        if distils and cfg.epochs > self.num_views:
            warnings.warn(
                f"{cfg.epochs} epochs over {self.num_views} view(s) per sample: views and their "
                f"targets repeat from epoch {self.num_views + 1}, and a student overfits repeated "
                "fixed targets (Beyer et al., CVPR 2022); dump more views or train fewer epochs",
                ViewsRepeatWarning,
                stacklevel=2,
            )
        self.epoch = 0  # epochs completed
        self.step = 0  # global steps completed
        self.best: dict[str, float] = {}  # best val top-1 per trained model
        self.history: list[EpochRecord] = []

    # -- set-up ----------------------------------------------------------------------------------

    def _load(self, spec: ModelSpec, **kwargs: Any) -> LoadedModel:
        loaded = load_model(spec, **kwargs)
        if loaded.num_classes != self.dataset.num_classes:
            raise ValueError(
                f"model {spec.name!r} ({spec.checkpoint or spec.arch}) has {loaded.num_classes} "
                f"classes, the data set {self.cfg.data} has {self.dataset.num_classes}"
            )
        return loaded

    def _load_student(self) -> LoadedModel:
        """The student: a checkpoint, timm's pretrained weights, or a random init (from scratch)."""
        cfg = self.cfg
        student = self._load(
            ModelSpec.parse(cfg.student),
            num_classes=self.dataset.num_classes,
            pretrained=cfg.pretrained,
            model_kwargs=cfg.model_kwargs,
        )
        if cfg.input_size is not None:
            student.data_config = {
                **student.data_config,
                "input_size": [3, cfg.input_size, cfg.input_size],
            }
        return student

    def _stream(self, data_config: Mapping[str, Any]) -> int:
        """Index of ``data_config`` among the loader's image streams (one per distinct config)."""
        config = json_data_config(data_config)
        if config not in self._data_configs:
            self._data_configs.append(config)
        return self._data_configs.index(config)

    def _open_store(self, student: LoadedModel | None) -> None:
        """Open the store, refusing one made for other data, classes or pool weights."""
        cfg = self.cfg
        reader = StoreReader(
            cfg.store,
            Expectation(
                fingerprint=self.dataset.fingerprint(),
                num_classes=self.dataset.num_classes,
                classes=list(self.dataset.classes),
                models=list(cfg.members) or None,
                # each given pool checkpoint must be the one its stored outputs were made with
                checkpoints={
                    name: file_sha256(spec.checkpoint)
                    for name, spec in self.pool_specs.items()
                    if spec.checkpoint is not None
                }
                or None,
            ),
        )
        if reader.keys != list(self.dataset.keys):
            raise StoreMismatchError(
                reader.path,
                ["keys: the store's samples are not the data set's, in the same order"],
                f"it was made from other data than {cfg.data}",
            )
        self.reader = reader
        if student is None or cfg.teachers is not Teachers.OFFLINE:
            return  # the store gives the views; the targets come from elsewhere
        if student.spec.name in reader.model_names:
            self._check_student_in_store(student)
        elif cfg.mode is PartitionMode.FIXED:
            raise ValueError(
                f"partition mode 'fixed' needs the student's initial outputs in the store, but "
                f"{student.spec.name!r} is not in its pool {reader.model_names}; dump the student "
                "with the pool (or name it as its pool member), or use --mode live|all"
            )
        self._set_columns(list(cfg.members) or reader.model_names, student.spec.name)

    def _check_student_in_store(self, student: LoadedModel) -> None:
        """A student that is a pool member: its stored outputs must be its own (weights, pixels)."""
        name = student.spec.name
        manifest = self.reader.manifest
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
                self.reader.path,
                problems,
                f"the store's {name!r} is another model than the student; name the student "
                "differently (alias:ARCH=CKPT) to train it as an outsider",
            )

    def _set_columns(self, pool: list[str], student: str) -> None:
        """The ``PoolTargets`` columns: the pool's teachers (never the student itself), and in
        ``fixed`` mode, last, the student's own initial outputs (``self_index``)."""
        teachers = [name for name in pool if name != student]
        if not teachers:
            raise ValueError(f"the pool {pool} has no teacher besides the student {student!r}")
        fixed = self.cfg.mode is PartitionMode.FIXED
        self.members = [*teachers, student] if fixed else teachers
        self.self_index = len(teachers) if fixed else None

    def _build_live_teachers(self, student: LoadedModel) -> None:
        """The pool's models, frozen, run forward every step. In ``fixed`` mode a frozen copy of
        the student's initial weights is the last column (what offline reads from the store)."""
        name = student.spec.name
        unknown = sorted(set(self.cfg.members) - set(self.pool_specs))
        if unknown:
            raise ValueError(f"--member {unknown} is not in the pool {list(self.pool_specs)}")
        own = self.pool_specs.get(name)
        if own is not None and own.checkpoint and file_sha256(own.checkpoint) != student.sha256:
            raise ValueError(f"--model {name} has other weights than the student {name!r}")
        self._set_columns(list(self.cfg.members) or list(self.pool_specs), name)
        for column in self.members:
            loaded = student if column == name else self._load(self.pool_specs[column])
            # The student's column is a frozen copy of its initial weights, never the learner.
            model = copy.deepcopy(loaded.model) if column == name else loaded.model
            self.teachers.append(
                LiveTeacher(
                    column,
                    model.to(self.device).eval().requires_grad_(False),
                    self._stream(loaded.data_config),
                )
            )

    def _make_learner(self, loaded: LoadedModel) -> Learner:
        cfg = self.cfg
        model = loaded.model.to(self.device).train()
        forward: nn.Module = model
        if self.dist.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            optimizer = torch.optim.Adam(
                params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        spec = loaded.spec
        from_scratch = spec.checkpoint is None and not cfg.pretrained
        return Learner(
            name=spec.name,
            arch=spec.arch,
            model=model,
            forward=forward,
            optimizer=optimizer,
            scheduler=None,
            data_config=json_data_config(loaded.data_config),
            model_kwargs=dict(loaded.model_kwargs),
            stream=self._stream(loaded.data_config),
            before=ModelSpec(spec.arch, self._initial_path(spec.name), spec.name)
            if from_scratch
            else spec,
        )

    def _make_schedulers(self) -> None:
        """Cosine decay to 0 over the run's steps, per step (``lr_schedule="cosine"``)."""
        if self.cfg.lr_schedule != "cosine":
            return
        total = max(1, self.cfg.epochs * self.steps_per_epoch)
        for learner in self.learners:
            learner.scheduler = torch.optim.lr_scheduler.LambdaLR(
                learner.optimizer,
                lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
            )

    def _initial_path(self, name: str) -> Path:
        return self.out_dir / f"{name}.init.pt"

    # -- which rows, in which order --------------------------------------------------------------

    def _usable_order(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.cfg.seed, epoch, len(self.dataset))
        if self.reader is not None and self.reader.skipped.any():
            order = order[~self.reader.skipped[order]]  # images the dump could not read
        return order

    def _global_batches(self, order: np.ndarray) -> list[np.ndarray]:
        """Global batches of ``batch_size``. A last batch too small to give every rank a row is
        dropped (a rank without rows cannot take part in the gradient all-reduce)."""
        size = self.cfg.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        if batches and len(batches[-1]) < self.dist.world_size:
            batches.pop()
        return batches

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's rows of ``epoch``: a disjoint, contiguous slice of every global batch."""
        order = self._usable_order(epoch)
        view_of = np.empty(len(self.dataset), dtype=np.int64)
        view_of[order] = epoch_views(self.cfg.seed, epoch, order, self.num_views)
        batches = self._global_batches(order)
        parts = [np.array_split(batch, self.dist.world_size)[self.dist.rank] for batch in batches]
        samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return EpochPlan(
            epoch=epoch,
            samples=samples,
            views=view_of[samples],
            rows_per_step=[len(part) for part in parts],
            global_rows=[len(batch) for batch in batches],
        )

    def view_boxes(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes [n, 4] and flips [n] of the rows: the store's, or replayed from the seed."""
        if self.reader is not None:
            return self.reader.view_params(samples, views)
        boxes, flips = view_params(
            self.cfg.seed, samples, self.num_views, self.dataset.sizes[samples], self.cfg.augment
        )
        rows = np.arange(len(samples))
        return boxes[rows, views], flips[rows, views]

    def stored_targets(self, samples: np.ndarray, views: np.ndarray) -> PoolTargets:
        """The store's targets of the pool members for rows (samples[i], views[i])."""
        return self.reader.read_pool(self.members, samples, views)

    def batches(self, plan: EpochPlan) -> Iterator[Batch]:
        """The plan's steps: images rebuilt from the views, stored targets read ahead in a thread."""
        local_batch = self.cfg.batch_size // self.dist.world_size
        boxes, flips = self.view_boxes(plan.samples, plan.views)
        workers = {} if self.cfg.num_workers is None else {"num_workers": self.cfg.num_workers}
        loader = view_loader(
            self.dataset,
            plan.samples,
            plan.views,
            boxes,
            flips,
            self._data_configs,
            batch_size=local_batch,
            backend=self.cfg.backend,
            device=self.device,
            **workers,
        )
        bounds = np.concatenate([[0], np.cumsum(plan.rows_per_step)])
        rows = [slice(bounds[i], bounds[i + 1]) for i in range(len(plan.rows_per_step))]
        offline = self.cfg.teachers is Teachers.OFFLINE and not self.cfg.joint
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-targets") as reads:
            ahead: deque[Future[PoolTargets]] = deque()

            def read_ahead(step: int) -> None:
                if offline and step < len(rows):
                    samples, views = plan.samples[rows[step]], plan.views[rows[step]]
                    ahead.append(reads.submit(self.stored_targets, samples, views))

            for step in range(PREFETCH_STEPS):
                read_ahead(step)
            for step, view_batch in enumerate(loader):
                samples = plan.samples[rows[step]]
                if not np.array_equal(view_batch.samples.numpy(), samples):
                    raise RuntimeError(
                        f"the view loader returned other rows than planned at step {step} of "
                        f"epoch {plan.epoch + 1} (expected samples {samples[:4].tolist()}...)"
                    )
                targets = None
                if offline:
                    targets = ahead.popleft().result().to(self.device, non_blocking=True)
                    read_ahead(step + PREFETCH_STEPS)
                yield Batch(
                    samples=samples,
                    views=plan.views[rows[step]],
                    labels=view_batch.labels.to(self.device, non_blocking=True),
                    images=view_batch.images,
                    global_rows=plan.global_rows[step],
                    targets=targets,
                )

    # -- one step ---------------------------------------------------------------------------------

    def live_targets(self, batch: Batch) -> PoolTargets:
        """Dense targets from the live teachers' logits on the batch's views."""
        with torch.no_grad(), autocast(self.device, self.cfg.amp):
            logits = [t.model(batch.images[t.stream]) for t in self.teachers]
        return PoolTargets.from_logits(torch.stack(logits, dim=1).float(), batch.labels)

    def loss(self, batch: Batch) -> tuple[Tensor, KDStats | None, list[Tensor]]:
        """The loss summed over the batch's rows, the kernel's per-row statistics (None without
        KD) and the learners' logits."""
        cfg = self.cfg
        with autocast(self.device, cfg.amp):
            logits = [learner.forward(batch.images[learner.stream]) for learner in self.learners]
        weights = {
            "temperature": cfg.temperature,
            "kd_weight": cfg.kd_weight,
            "ce_weight": cfg.ce_weight,
        }
        if cfg.joint:
            loss, stats = bidirectional_kd_loss(
                logits, batch.labels, stop_grad=cfg.stop_grad, reduction="sum", **weights
            )
        elif cfg.teachers is Teachers.NONE:
            return F.cross_entropy(logits[0].float(), batch.labels, reduction="sum"), None, logits
        else:
            targets = (
                batch.targets if cfg.teachers is Teachers.OFFLINE else self.live_targets(batch)
            )
            loss, stats = partitioned_kd_loss(
                logits[0],
                batch.labels,
                targets,
                mode=cfg.mode,
                self_index=self.self_index,
                reduction="sum",
                **weights,
            )
        return loss, stats, logits

    def train_step(self, batch: Batch) -> tuple[float, float]:
        """One optimiser step on the global batch: its mean loss and the share of rows taught."""
        for learner in self.learners:
            learner.optimizer.zero_grad(set_to_none=True)
        loss_sum, stats, logits = self.loss(batch)
        # This rank's sum / the global batch size, times the world size DDP averages over: the
        # gradient of the global batch's mean loss, the same for one process or many.
        (loss_sum * (self.dist.world_size / batch.global_rows)).backward()
        loss_sum = loss_sum.detach().float()
        totals = torch.stack(
            [
                loss_sum,
                torch.zeros_like(loss_sum)
                if stats is None
                else (stats.chosen != NO_TEACHER).sum().float(),
                (~torch.isfinite(loss_sum)).float(),
            ]
        )
        if self.dist.enabled:
            dist.all_reduce(totals)
        loss_total, taught_total, non_finite = totals.tolist()
        if non_finite:
            self._raise_non_finite(batch, logits)
        for learner in self.learners:
            learner.optimizer.step()
            if learner.scheduler is not None:
                learner.scheduler.step()
        self.step += 1
        share = math.nan if stats is None else taught_total / batch.global_rows
        return loss_total / batch.global_rows, share

    def _raise_non_finite(self, batch: Batch, logits: Sequence[Tensor]) -> None:
        """Stop before the optimiser step, naming the step, the samples and the culprit."""
        found = []
        for learner, z in zip(self.learners, logits, strict=True):
            bad = (~torch.isfinite(z.detach()).all(dim=1)).nonzero().flatten().tolist()
            if bad:
                keys = [self.dataset.keys[batch.samples[row]] for row in bad[:8]]
                found.append(f"NaN/inf logits of {learner.name!r} on samples {keys}")
        if not found:
            keys = [self.dataset.keys[sample] for sample in batch.samples[:8]]
            found.append(f"NaN/inf targets (the logits are finite) among samples {keys}")
        if self.dist.enabled:
            everywhere: list[list[str] | None] = [None] * self.dist.world_size
            dist.all_gather_object(everywhere, found)
            found = [
                f"rank {rank}: {line}" for rank, lines in enumerate(everywhere) for line in lines
            ]
        state = self.out_dir / STATE_FILE
        kept = f"the last checkpoint {state} is kept" if state.exists() else "no checkpoint yet"
        raise NonFiniteError(
            f"non-finite loss at step {self.step + 1} (epoch {self.epoch + 1}): "
            + "; ".join(found)
            + f". Stopped before the optimiser step; {kept}."
        )

    # -- the run ----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs`` epochs (continuing the checkpoint with ``resume``), then report."""
        cfg = self.cfg
        state_path = self.out_dir / STATE_FILE
        if state_path.exists() and not cfg.resume:
            raise FileExistsError(
                f"{state_path} exists: resume that run (--resume) or choose another out_dir"
            )
        if state_path.exists():
            self.load_state(state_path)
        else:
            if self.dist.is_main:
                self._save_initial_weights()
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout noise: its own on every rank
        with self._progress() as progress:
            task = progress.add_task(
                self._title(),
                total=cfg.epochs * self.steps_per_epoch,
                completed=self.step,
                loss=0.0,
            )
            while self.epoch < cfg.epochs:
                record = self._run_epoch(progress, task)
                self.history.append(record)
                self._select_and_checkpoint(record)
                if self.dist.is_main:
                    progress.console.log(describe_epoch(record, cfg.epochs))
        checkpoints = {m.name: self.out_dir / f"{m.name}.pt" for m in self.learners}
        report = self.transfer_report(checkpoints) if cfg.report and self.dist.is_main else None
        self._barrier()
        return TrainResult(self.out_dir, checkpoints, state_path, self.history, report)

    def _run_epoch(self, progress: Progress, task: TaskID) -> EpochRecord:
        start = time.perf_counter()
        loss_sum = taught_sum = 0.0
        rows = steps = 0
        description = f"{self._title()} epoch {self.epoch + 1}/{self.cfg.epochs}"
        for batch in self.batches(self.plan(self.epoch)):
            loss, taught = self.train_step(batch)
            loss_sum += loss * batch.global_rows
            taught_sum += taught * batch.global_rows
            rows += batch.global_rows
            steps += 1
            progress.update(task, advance=1, loss=loss, description=description)
        self.epoch += 1
        seconds = time.perf_counter() - start
        return EpochRecord(
            epoch=self.epoch,
            steps=self.step,
            loss=loss_sum / max(rows, 1),
            taught=taught_sum / max(rows, 1),
            val_top1=self.validate(),
            seconds=seconds,
            steps_per_second=steps / seconds,
        )

    def _title(self) -> str:
        return "+".join(learner.name for learner in self.learners)

    @cached_property
    def val_dataset(self) -> ImageDataset:
        return open_dataset(self.cfg.val_data)

    def validate(self) -> dict[str, float]:
        """Top-1 (%) of each trained model on the held-out ``val_data`` (main rank only)."""
        if self.cfg.val_data is None or not self.dist.is_main:
            return {}
        dataset = self.val_dataset
        predictions = evaluate(
            {learner.name: learner.model for learner in self.learners},
            {learner.name: learner.data_config for learner in self.learners},
            dataset,
            batch_size=self.cfg.batch_size,
            device=self.device,
            backend=self.cfg.backend,
            amp=self.cfg.amp,
        )
        for learner in self.learners:
            learner.model.train()
        return {
            name: 100.0 * float((p == dataset.labels).mean()) for name, p in predictions.items()
        }

    def _select_and_checkpoint(self, record: EpochRecord) -> None:
        """Keep each model's best weights on val (the latest without val data), then the state."""
        if self.dist.is_main:
            for learner in self.learners:
                score = record.val_top1.get(learner.name)
                if score is not None and score <= self.best.get(learner.name, -math.inf):
                    continue
                if score is not None:
                    self.best[learner.name] = score
                self._save_weights(learner, self.out_dir / f"{learner.name}.pt", record)
            write_json(self.out_dir / HISTORY_FILE, [asdict(r) for r in self.history])
        self.save_state(self.out_dir / STATE_FILE)

    def _save_weights(self, learner: Learner, path: Path, record: EpochRecord | None) -> None:
        extra: dict[str, Any] = {"trained_from": spec_text(learner.before)}
        if record is not None:
            extra.update(epoch=record.epoch, step=record.steps, val_top1=record.val_top1)
        save_checkpoint(
            path, learner.model, learner.arch, learner.model_kwargs, learner.data_config, extra
        )

    def _save_initial_weights(self) -> None:
        """A student trained from scratch keeps its random init: the report's 'before'."""
        for learner in self.learners:
            if learner.before.checkpoint == self._initial_path(learner.name):
                self._save_weights(learner, learner.before.checkpoint, None)

    # -- checkpoint -------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        state = {  # tensors and plain types only: the state file loads with weights_only=True
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
            "python": random.getstate(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_state(self, path: Path) -> None:
        """Atomically write all ``resume`` needs: rank 0 writes, with every rank's RNG state."""
        rng = [self._rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, self._rng_state())
        if self.dist.is_main:
            atomic_torch_save(
                path,
                {
                    "config": self.cfg.to_dict(),
                    "epoch": self.epoch,
                    "step": self.step,
                    "best": dict(self.best),
                    "history": [asdict(r) for r in self.history],
                    "rng": rng,
                    "learners": {
                        learner.name: {
                            "model": learner.model.state_dict(),
                            "optimizer": learner.optimizer.state_dict(),
                            "scheduler": learner.scheduler.state_dict()
                            if learner.scheduler is not None
                            else None,
                        }
                        for learner in self.learners
                    },
                },
            )
        self._barrier()

    def load_state(self, path: Path) -> None:
        """Continue the run in ``path``: refuse another configuration, restore every state."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        saved, now = payload["config"], self.cfg.to_dict()
        changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"cannot resume {path} with another configuration: {details}")
        for learner in self.learners:
            state = payload["learners"][learner.name]
            learner.model.load_state_dict(state["model"])
            learner.optimizer.load_state_dict(state["optimizer"])
            if learner.scheduler is not None:
                learner.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = payload["epoch"], payload["step"]
        self.best = dict(payload["best"])
        self.history = [EpochRecord(**record) for record in payload["history"]]
        rng = payload["rng"]
        if len(rng) != self.dist.world_size:
            warnings.warn(
                f"{path} was written by {len(rng)} rank(s), this run has {self.dist.world_size}: "
                "random states are re-seeded, so dropout noise differs from an unbroken run",
                stacklevel=2,
            )
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1000 * self.epoch)
            return
        mine = rng[self.dist.rank]
        torch.set_rng_state(mine["torch"])
        kind, keys, position, has_gauss, gauss = mine["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(mine["python"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)

    # -- report -----------------------------------------------------------------------------------

    def transfer_report(self, checkpoints: Mapping[str, Path]) -> TransferReport | None:
        """Before/after figures of the trained models against the pool, on ``eval_data``."""
        data = self.cfg.eval_data or self.cfg.val_data
        if data is None:
            return None
        before = {learner.name: learner.before for learner in self.learners}
        for name, spec in self.pool_specs.items():
            before.setdefault(name, spec)
        after = [ModelSpec(m.arch, checkpoints[m.name], m.name) for m in self.learners]
        report = transfer_from_checkpoints(
            data,
            list(before.values()),
            after,
            batch_size=self.cfg.batch_size,
            device=self.device,
            backend=self.cfg.backend,
        )
        report.save(self.out_dir / REPORT_STEM)
        return report

    # -- helpers ----------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _StepsPerSecond(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not (self.cfg.progress and self.dist.is_main),
        )


class _StepsPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text("- steps/s" if task.speed is None else f"{task.speed:.2f} steps/s")


def describe_epoch(record: EpochRecord, epochs: int) -> str:
    """One log line per epoch."""
    parts = [f"epoch {record.epoch}/{epochs}: loss {record.loss:.4f}"]
    if not math.isnan(record.taught):
        parts.append(f"{100 * record.taught:.0f}% of rows taught")
    parts += [f"val top-1 {name} {top1:.2f}%" for name, top1 in record.val_top1.items()]
    parts.append(f"{record.steps_per_second:.2f} steps/s")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Entry points


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.student`` (or, with ``joint``, all ``cfg.models`` together)."""
    return Trainer(cfg).fit()


@dataclass
class PoolResult:
    """``train_all``: each member's run, and the pool's transfer report."""

    runs: dict[str, TrainResult]
    report: TransferReport | None


def train_all(cfg: TrainConfig) -> PoolResult:
    """Every pool member in turn is the student of the others: role-agnostic transfer.

    The members are the store's (or ``cfg.members``); each needs its checkpoint in ``cfg.models``
    (``NAME=CKPT``, verified against the store's sha256). Member ``m`` trains in
    ``out_dir/m``; the pool's report (every member before and after) goes to ``out_dir``.
    """
    if cfg.joint:
        raise ValueError("train_all trains the members one at a time; joint trains them together")
    pool = {spec.name: spec for spec in parse_pool(cfg.models)} if cfg.models else {}
    if cfg.store is not None:
        names = list(cfg.members) or StoreReader(cfg.store).model_names
    else:
        names = list(cfg.members) or list(pool)
    missing = [name for name in names if name not in pool]
    if missing:
        raise ValueError(
            f"training every member needs each one's checkpoint: give --model NAME=CKPT for "
            f"{missing} (the pool is {names})"
        )
    runs = {}
    for name in names:
        member = replace(
            cfg, student=spec_text(pool[name]), out_dir=cfg.out_dir / name, report=False
        )
        runs[name] = train(member)
    report = None
    data = cfg.eval_data or cfg.val_data
    rank = int(os.environ.get("RANK", "0"))
    if cfg.report and data is not None and rank == 0:
        after = [
            ModelSpec(pool[name].arch, run.checkpoints[name], name) for name, run in runs.items()
        ]
        report = transfer_from_checkpoints(
            data,
            list(pool.values()),
            after,
            batch_size=cfg.batch_size,
            device=resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0"))),
            backend=cfg.backend,
        )
        report.save(cfg.out_dir / REPORT_STEM)
    return PoolResult(runs, report)
