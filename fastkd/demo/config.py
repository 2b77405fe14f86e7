"""What a demo run is: its arms, its settings, and where each artifact of those settings lives.

One home for everything that decides *which* work the demo does, so that the stages
(``fastkd.demo.run``) and the report (``fastkd.demo.report``) read the same arms and settings,
and the cache folders are keyed by exactly the settings that shape their contents.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fastkd.augment import AugmentConfig
from fastkd.digits import DIGITS_POOL, POOL_IMAGE_SIZE, PoolMember, fold_list_name
from fastkd.dump import DumpConfig
from fastkd.errors import ConfigError
from fastkd.loss_settings import LOSS_FIELDS, LossSettings

IMAGE_SIZE = POOL_IMAGE_SIZE  # the digits folder; the pool's models take this input size
_KEY_CHARS = 12  # hex digits of a cache folder's hash
PREDICTIONS_FILE = "test-predictions.json"  # a finished stage's test predictions, written last


@dataclass(frozen=True)
class Arm:
    """One way of training every pool member: the same steps, views and learning rate.

    ``train``: the ``TrainConfig`` fields that make it, so every arm is a real mode of ``fastkd
    train`` (``flags`` is the command line that runs it).
    """

    name: str
    title: str  # what the papers call it
    train: Mapping[str, Any]
    description: str
    lr_per_256: float | None = None  # the arm's own lr per 256 images (a paper's), else the demo's

    def lr(self, demo_lr: float, batch_size: int) -> float:
        """The arm's learning rate: its own scaled by the batch (as the paper's code does), or
        the demo's ``transfer_lr``."""
        return demo_lr if self.lr_per_256 is None else self.lr_per_256 * batch_size / 256

    @property
    def loss(self) -> LossSettings:
        """The arm's loss settings (its ``train`` values of ``LossSettings``' fields)."""
        return LossSettings(**{k: v for k, v in self.train.items() if k in LOSS_FIELDS})

    @property
    def run_fields(self) -> dict[str, Any]:
        """The arm's other ``TrainConfig`` fields (``teachers``, ``joint``)."""
        return {k: v for k, v in self.train.items() if k not in LOSS_FIELDS}

    def flags(self, demo_lr: float, batch_size: int) -> str:
        """The ``fastkd train`` options that make this arm (with ``--lr``: ``lr``)."""
        options = {**self.train, "lr": f"{self.lr(demo_lr, batch_size):g}"}
        return " ".join(
            f"--{'no-' * (value is False)}{name.replace('_', '-')}"
            if isinstance(value, bool)
            else f"--{name.replace('_', '-')} {value}"
            for name, value in options.items()
        )


# Roth et al.'s recipe (the ``kl-dp`` preset: KL only, T = 1, SGD with momentum 0.9 and weight
# decay 1e-4, lr per 256 images), its lr scaled to the demo: the preset's 1e-4 fine-tunes ImageNet
# models and barely moves these small ones, so the base lr is the one of a declared grid with the
# best mean val top-1 of both Roth arms on fold 0, test images unread (bench/demo_lr_pilot.py,
# bench/results/demo-roth-lr-pilot.json).
ROTH_BASE_LR = 1e-2  # per 256 images, as the preset's lr (x batch_size / 256)
ROTH_RECIPE = {"ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0, "optimizer": "sgd",
               "momentum": 0.9, "weight_decay": 1e-4}  # fmt: skip

ARMS: tuple[Arm, ...] = (
    Arm(
        "ce",
        "CE fine-tuning",
        {"teachers": "none"},
        "cross-entropy on the labels for the same steps, no teacher (every arm's control)",
    ),
    Arm(
        "plain",
        "plain KD",
        {"mode": "plain"},
        "the other members' mean distribution on every sample, chosen without labels; + CE",
    ),
    Arm(
        "best",
        "best-teacher KD",
        {"mode": "best"},
        "the other member most confident on the true class teaches every sample; + CE",
    ),
    Arm(
        "kl_dp",
        "KL+DP partition + CE",
        {"mode": "fixed"},
        "Roth et al.'s partition (the most confident other member where it beats the student's "
        "initial self on the true class, else the student's own initial outputs), with CE kept",
    ),
    Arm(
        "bikd",
        "offline Bi-KD",
        {"mode": "live"},
        "the most confident other member teaches where it beats the current student on the true "
        "class (stored targets); + CE, as Bi-KD's loss",
    ),
    Arm(
        "joint",
        "joint Bi-KD",
        {"joint": True, "stop_grad": False},
        "Jain et al.'s own training: the whole pool at once, per sample the member most "
        "confident on the true class teaches the others, the KD gradient reaching both sides "
        "(no stop-gradient, as their code's one backward); + CE",
    ),
    Arm(
        "kl_dp_free",
        "label-free KL+DP + CE",
        {"mode": "fixed", "partition_score": "confidence"},
        "the KL+DP partition by each model's confidence in its own top class: the partition "
        "reads no label (the CE term still does)",
    ),
    Arm(
        "kl",
        "plain KL (Roth)",
        {"mode": "plain", **ROTH_RECIPE},
        "Roth et al.'s baseline loss: KL to the other members' mean distribution on every "
        "sample, no CE, T = 1, their SGD recipe",
        lr_per_256=ROTH_BASE_LR,
    ),
    Arm(
        "kl_dp_roth",
        "KL+DP (Roth)",
        {"mode": "fixed", **ROTH_RECIPE},
        "Roth et al.'s KL+DP as their code trains it: the partition of kl_dp, no CE, T = 1, "
        "their SGD recipe",
        lr_per_256=ROTH_BASE_LR,
    ),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}
CONTROL_ARM = "ce"  # a member succeeds where its change beats this arm's (interval above 0)


@dataclass(frozen=True)
class Question:
    """A comparison the demo answers: ``arm`` minus ``control`` on the same test images."""

    arm: str
    control: str
    role: str  # "primary", "secondary" or "third"


# Declared before any run: the question fastkd exists for, whether transfer beats CE, and Roth
# et al.'s: does the data partition protect what plain KL distillation loses (their loss)?
QUESTIONS: tuple[Question, ...] = (
    Question("bikd", "plain", "primary"),
    Question("bikd", "ce", "secondary"),
    Question("kl_dp_roth", "kl", "third"),
)


def _digits_augment() -> AugmentConfig:
    """Crops of at least a third of the image, no flips (a mirrored digit is another glyph), and
    the whole image as the eval view (the pool's data configs use crop_pct 1)."""
    return AugmentConfig(scale=(0.35, 1.0), hflip=0.0, eval_crop_pct=1.0)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo depends on. The defaults are the full demo (its measured time on two
    CPU cores is in the README); ``DemoConfig.quick()`` runs the same stages and arms on one fold
    with far fewer steps.
    """

    out_dir: Path = Path("runs/demo")
    folds: int = 5  # cross-validation: every image is a test image of one fold
    fold_ids: tuple[int, ...] | None = None  # the folds that run (None: all)
    seeds: tuple[int, ...] = (0,)  # transfer stage seeds, per fold
    pool: tuple[PoolMember, ...] = DIGITS_POOL
    pool_seed: int = 0  # pretraining (init, order, views, subsets), folds and the store's views
    views: int = 3  # stored views per training image; view 0 is the eval view
    transfer_epochs: int = 3  # <= views: no stored target is seen twice
    transfer_lr: float = 1e-4  # Adam, constant, every arm: fine-tuning
    batch_size: int = 128
    augment: AugmentConfig = field(default_factory=_digits_augment)
    topk: int = 0  # stored classes per view: 0 (or >= the 10 classes) keeps every class, dense
    tail: str | None = None  # tail model of sparse targets; None: the dump's default rule
    tail_samples: int = 8  # draws per view of the sampled tail
    resamples: int = 2000  # paired bootstrap over test images
    device: str = "auto"  # cuda when there is one
    backend: str = "auto"  # image pipeline: DALI when installed, else nvjpeg on a GPU, else torch
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if self.fold_ids is not None:
            object.__setattr__(self, "fold_ids", tuple(int(f) for f in self.fold_ids))
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and at least one, got {self.seeds}")
        if len(self.pool) < 2:
            problems.append(f"the pool needs at least 2 members, got {len(self.pool)}")
        if self.folds < 3:
            problems.append(f"folds must be >= 3 (test, val and train folds), got {self.folds}")
        elif self.fold_ids is not None and (
            not self.fold_ids
            or len(set(self.fold_ids)) != len(self.fold_ids)
            or not all(0 <= f < self.folds for f in self.fold_ids)
        ):
            problems.append(
                f"fold_ids must be distinct folds in 0..{self.folds - 1}, got {self.fold_ids}"
            )
        if min(self.views, self.transfer_epochs, self.batch_size, self.resamples) < 1:
            problems.append(
                f"views, transfer_epochs, batch_size and resamples must be >= 1, got "
                f"{self.views}, {self.transfer_epochs}, {self.batch_size}, {self.resamples}"
            )
        if self.transfer_epochs > self.views:
            problems.append(
                f"transfer_epochs ({self.transfer_epochs}) must not exceed the stored views "
                f"({self.views}): a student would see the same targets again"
            )
        try:  # the dump's own rule for what is stored, so the two cannot disagree
            targets = DumpConfig(
                data=Path(),
                models=(),
                out=Path(),
                topk=self.topk,
                tail=self.tail,
                tail_samples=self.dump_tail_samples,
            )
        except ConfigError as error:
            problems.append(f"stored targets: {error}")
        else:
            object.__setattr__(self, "tail", targets.tail)
        if problems:
            raise ConfigError("invalid demo configuration: " + "; ".join(problems))

    @property
    def dump_tail_samples(self) -> int | None:
        """The draws the dump is given: only the sampled tail reads them."""
        return self.tail_samples if self.tail == "sampled" else None

    @property
    def run_folds(self) -> tuple[int, ...]:
        """The folds that run, in order."""
        return self.fold_ids if self.fold_ids is not None else tuple(range(self.folds))

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Under a minute on two CPU cores: fold 0 only, a fifth of the pretraining epochs, 2
        stored views, 1 transfer epoch in batches of 256. The stages, arms and report are the
        full demo's; its numbers are a smoke test, not a result."""
        pool = tuple(replace(m, epochs=max(1, m.epochs // 5)) for m in DIGITS_POOL)
        settings: dict[str, Any] = {
            "pool": pool,
            "fold_ids": (0,),
            "views": 2,
            "transfer_epochs": 1,
            "batch_size": 256,
            "resamples": 500,
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def target_settings(self) -> dict[str, Any]:
        """What the dump is asked to keep of each member's logits (the store's cache key has it:
        stores of other settings live in other folders); ``tail_samples`` only where read."""
        return {"topk": self.topk, "tail": self.tail, "tail_samples": self.dump_tail_samples}


@functools.cache
def code_version() -> str:
    """sha256 of the library's and the kernels' Python sources: a cache folder made by other
    code (another arm, loss, default or fix) is another folder, never reused. The sources are
    found, not imported (``importlib.util.find_spec``)."""
    digest = hashlib.sha256()
    for package in ("fastkd", "fastkd.kernels"):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find the sources of {package}")
        root = Path(spec.origin).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _key(*parts: Any) -> str:
    """Short hash of JSON-able settings and the code: the name of a cache folder they fully
    determine."""
    text = json.dumps([code_version(), *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_CHARS]


@dataclass(frozen=True)
class DemoLayout:
    """Where every artifact of one fold of a demo configuration lives under ``out_dir``."""

    out_dir: Path
    fold: int
    folds: int
    seed: int  # the folds' split seed (the pool seed)
    pool_key: str
    store_key: str
    transfer_key: str

    @classmethod
    def of(cls, cfg: DemoConfig, fold: int | None = None) -> DemoLayout:
        """The layout of ``fold`` (default: the first fold that runs)."""
        fold = cfg.run_folds[0] if fold is None else fold
        pretraining = [[asdict(m) for m in cfg.pool], cfg.pool_seed, asdict(cfg.augment)]
        pool_key = _key("pool", IMAGE_SIZE, cfg.folds, fold, pretraining)
        store_key = _key(
            "store", pool_key, cfg.views, cfg.pool_seed, asdict(cfg.augment), cfg.target_settings()
        )
        transfer_key = _key(
            "transfer", store_key, cfg.transfer_epochs, cfg.transfer_lr, cfg.batch_size
        )
        return cls(cfg.out_dir, fold, cfg.folds, cfg.pool_seed, pool_key, store_key, transfer_key)

    @property
    def data(self) -> Path:
        """The digits folder (every fold's file lists live in it, beside the images)."""
        return self.out_dir / "digits"

    def split(self, name: str) -> Path:
        """The fold's ``train`` / ``val`` / ``test`` file list (``digits.write_fold_lists``)."""
        return self.data / fold_list_name(self.folds, self.fold, self.seed, name)

    def member_list_name(self, member: str) -> str:
        """The file list of a member's pretraining part of the fold's train split."""
        return f"pool-{self.pool_key}-{member}.txt"

    @property
    def pool(self) -> Path:
        return self.out_dir / "pool" / self.pool_key

    @property
    def store(self) -> Path:
        return self.pool / f"store-{self.store_key}"

    @property
    def pool_predictions(self) -> Path:
        """The pool's test predictions before transfer (``predictions.json`` layout)."""
        return self.pool / PREDICTIONS_FILE

    def pretraining(self, member: str) -> Path:
        return self.pool / member

    def transfer(self, seed: int, arm: str) -> Path:
        return self.out_dir / "transfer" / self.transfer_key / f"seed-{seed}" / arm

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.out_dir)).as_posix()
