"""``TrainConfig``: everything a training run depends on, checked once, stored with its state.

Every problem of a configuration is collected into one ``ConfigError`` naming each field, so a
library user gets the same guards as the CLI (e.g. view options that a store would ignore).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastkd.augment import AugmentConfig
from fastkd.choices import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    PartitionScore,
    Teachers,
)
from fastkd.errors import ConfigError
from fastkd.loss_settings import LossSettings
from fastkd.presets import PresetName
from fastkd.runtime import plain
from fastkd.storage import local_or_url


@dataclass
class TrainConfig:
    """Everything a training run depends on; JSON-able, stored with the run's checkpoint.

    Optimiser defaults follow the references for fine-tuning pretrained models: Adam lr 1e-6, wd
    1e-5 (Bi-KD); with ``optimizer="sgd"`` lr 1e-4, momentum 0.9 (KL+DP). Short runs on small data
    usually want a larger lr; training from scratch needs one (e.g. Adam 1e-3).
    """

    data: Path | str  # training images: folder, file list, tar shards (s3:// URLs: str)
    data_root: Path | None = None  # root of a file list's paths (default: the list's folder)
    student: str | None = None  # [alias:]ARCH[=CKPT], its name its key in the store (all: None)
    store: Path | str | None = None  # stored targets, folder or s3:// (teachers=offline); optional else
    models: tuple[str, ...] = ()  # pool member specs with checkpoints: live / joint / train_all
    members: tuple[str, ...] = ()  # store members that teach (default: all of them)
    teachers: Teachers = Teachers.OFFLINE
    loss: LossSettings = field(default_factory=LossSettings)  # mode, score, T, weights, stop-grad
    joint: bool = False  # Bi-KD of all ``models`` at once (live, bidirectional kernel)
    preset: str | None = None  # --preset's name (fastkd.presets), so a run names its source
    preset_not_applied: tuple[str, ...] = ()  # the preset's settings this run leaves out
    epochs: int = 10
    batch_size: int = DEFAULT_BATCH_SIZE  # global: split across DDP ranks
    optimizer: str = "adam"  # adam | sgd
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    model_lr: dict[str, float] = field(default_factory=dict)  # a trained model's name -> its lr
    weight_decay: float = 1e-5
    momentum: float = 0.9  # SGD only
    lr_schedule: str = "constant"  # constant | cosine (per step, to 0 at the last epoch)
    seed: int = 0  # sample order, view choice, torch init; views without a store
    views: int | None = None  # without a store: views per sample (view 0 is the eval view; 1)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # without a store
    pretrained: bool = True  # student without checkpoint: timm's weights; False: from scratch
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # timm.create_model kwargs
    input_size: int | None = None  # the students' image side, over their data config's
    val_data: Path | str | None = None  # held out from the training data: model selection
    eval_data: Path | str | None = None  # the final report's data (default: val_data)
    out_dir: Path = Path("runs/train")
    resume: bool = False
    overwrite: bool = False  # start over in a run folder that holds a run (never a user's folder)
    device: str = "auto"  # auto: cuda:LOCAL_RANK if available, else cpu
    amp: bool = True  # bf16 autocast on GPU
    cuda_graphs: bool = False  # full batches' steps by CUDA-graph replay (training.graphed_step)
    torch_compile: bool = False  # forward and loss as one torch.compile'd function (compiled)
    backend: str = "auto"  # view_loader backend (choices.Backend): auto | dali | nvjpeg | torch
    num_workers: int | None = None
    progress: bool = True
    report: bool = True  # transfer report at the end (needs eval_data or val_data)
    control: bool = False  # also train the cross-entropy control; report the difference to it

    def __post_init__(self) -> None:
        for name in ("data_root", "out_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))
        for name in ("data", "store", "val_data", "eval_data"):  # s3:// URLs stay as given
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, local_or_url(value))
        self.models = tuple(self.models)
        self.members = tuple(self.members)
        self.preset_not_applied = tuple(self.preset_not_applied)
        if isinstance(self.augment, Mapping):
            self.augment = AugmentConfig.from_dict(self.augment)
        if isinstance(self.loss, Mapping):
            self.loss = LossSettings.from_dict(self.loss)
        problems = []
        try:
            self.teachers = Teachers(self.teachers)
        except ValueError:
            choices = [member.value for member in Teachers]
            problems.append(f"--teachers must be one of {choices}, got {self.teachers!r}")
        try:
            self.preset = None if self.preset is None else PresetName(self.preset).value
        except ValueError:
            choices = [member.value for member in PresetName]
            problems.append(f"--preset must be one of {choices}, got {self.preset!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_views < 1:
            problems.append(
                f"--epochs, --batch-size and --views must be >= 1, got "
                f"{self.epochs}, {self.batch_size}, {self.num_views}"
            )
        if self.optimizer not in DEFAULT_LR:
            problems.append(
                f"--optimizer must be one of {sorted(DEFAULT_LR)}, got {self.optimizer!r}"
            )
        if self.input_size is not None and self.input_size < 1:
            problems.append(f"--input-size must be >= 1 (px), got {self.input_size}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"--lr must be positive, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"--weight-decay must be finite and >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:  # 1 and above: the velocity never decays, and grows
            problems.append(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.lr is not None and not math.isfinite(self.lr):
            problems.append(f"--lr must be finite, got {self.lr}")
        problems += self._model_lr_problems()
        if self.joint and len(self.models) < 2:
            problems.append("joint training needs at least 2 models (--model NAME=CKPT each)")
        if self.joint and self.loss.partition_score == PartitionScore.CONFIDENCE:
            problems.append(
                "--partition-score: joint Bi-KD compares p(y) (the bidirectional kernel); "
                "--partition-score confidence is for --mode live|fixed|best"
            )
        if self.teachers == Teachers.OFFLINE and not self.joint and self.store is None:
            problems.append("offline teachers need a store (--store), or use --teachers live|none")
        if self.teachers == Teachers.LIVE and not self.joint and not self.models:
            problems.append("live teachers need the pool's checkpoints (--model NAME=CKPT)")
        if self.store is not None and self.augment != AugmentConfig():
            problems.append(
                "view augmentation: the views of a store are the ones it was dumped with: leave out the "
                "view augmentation options with a store (set them on `fastkd dump`)"
            )
        if self.store is not None and self.views is not None:  # even --views 1 would be ignored
            problems.append(
                f"--views {self.views} with --store: a store has the views it was dumped with "
                "(`fastkd dump --views`); leave out --views"
            )
        if self.resume and self.overwrite:
            problems.append(
                "--resume continues the run in --out, --overwrite starts it over: give one"
            )
        if self.control and self.report_data is None:
            problems.append(
                "--control compares the run with its control on --val-data or --test-data: give "
                "one (without, the control would train for nothing)"
            )
        if self.control and (self.joint or self.teachers == Teachers.NONE):
            problems.append(
                "--control trains a student with --teachers none beside the run; a run without "
                "teachers is its own control, and --joint has no single student (train each with "
                "--teachers none for its control)"
            )
        if self.torch_compile and self.cuda_graphs:
            problems.append(
                "--compile and --cuda-graphs: a compiled step has not been captured in a CUDA "
                "graph yet; give one of them"
            )
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def lr_for(self, name: str) -> float:
        """The learning rate of the trained model ``name``: its own (``--lr NAME=VALUE``), else
        the run's."""
        return self.model_lr.get(name, self.learning_rate)

    def _model_lr_problems(self) -> list[str]:
        """Each ``model_lr`` name is a model this run can train, each value positive, finite."""
        self.model_lr = {str(name): float(value) for name, value in dict(self.model_lr).items()}
        if not self.model_lr:
            return []
        from fastkd.models import ModelSpec, parse_pool  # heavy: only for per-model lrs

        if self.student is not None and not self.joint:  # the others only teach
            names = [ModelSpec.parse(self.student).name]
        else:  # --joint, or --all: every --model trains
            names = [spec.name for spec in parse_pool(self.models)]
        problems = []
        unknown = sorted(set(self.model_lr) - set(names))
        if unknown:
            problems.append(
                f"--lr NAME=VALUE: {', '.join(map(repr, unknown))} does not train in this run; "
                f"the trained models are {', '.join(map(repr, dict.fromkeys(names))) or 'none'}"
            )
        bad = {n: v for n, v in self.model_lr.items() if not (v > 0 and math.isfinite(v))}
        if bad:
            problems.append(f"--lr NAME=VALUE must be positive and finite, got {bad}")
        return problems

    @property
    def report_data(self) -> Path | str | None:
        """The data of the final transfer report: ``eval_data``, else ``val_data``."""
        return self.eval_data or self.val_data

    @property
    def num_views(self) -> int:
        """Views per sample without a store (``views``, else 1)."""
        return 1 if self.views is None else self.views

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: paths as strings, enums as values; ``views`` as a run without a store
        uses it (a saved state compares it)."""
        values = plain(asdict(self))
        values["loss"] = self.loss.to_dict()
        values["views"] = None if self.store is not None else self.num_views
        return values
