"""What a demo run is: its arms, its settings, and where each artifact of those settings lives.

One home for everything that decides *which* work the demo does, so that the stages
(``fastkd.demo.run``) and the report (``fastkd.demo.report``) read the same arms and settings,
and the cache folders are keyed by exactly the settings that shape their contents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import fastkd
from fastkd.digits import DIGITS_POOL, PoolMember
from fastkd.dump import DumpConfig
from fastkd.errors import ConfigError
from fastkd.partition import PartitionMode
from fastkd.training import Teachers
from fastkd.views import AugmentConfig

IMAGE_SIZE = 32  # the digits folder; the pool's models take this input size
_KEY_CHARS = 12  # hex digits of a cache folder's hash


@dataclass(frozen=True)
class Arm:
    """One way of training every pool member: the same steps, views and learning rate."""

    name: str
    teachers: Teachers
    mode: PartitionMode  # ignored without teachers
    control: bool
    description: str


ARMS: tuple[Arm, ...] = (
    Arm(
        "live",
        Teachers.OFFLINE,
        PartitionMode.LIVE,
        False,
        "Bi-KD partition: the most confident other member teaches where it beats the student",
    ),
    Arm(
        "fixed",
        Teachers.OFFLINE,
        PartitionMode.FIXED,
        False,
        "KL+DP: the best of the others and the student's own stored initial outputs",
    ),
    Arm(
        "all",
        Teachers.OFFLINE,
        PartitionMode.ALL,
        True,
        "control, plain KD: the most confident other member teaches on every sample",
    ),
    Arm(
        "ce",
        Teachers.NONE,
        PartitionMode.LIVE,
        True,
        "control: cross-entropy fine-tuning, no teacher",
    ),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}


def _digits_augment() -> AugmentConfig:
    """Crops of at least a third of the image, no flips (a mirrored digit is another glyph), and
    the whole image as the eval view (the pool's data configs use crop_pct 1)."""
    return AugmentConfig(scale=(0.35, 1.0), hflip=0.0, eval_crop_pct=1.0)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo depends on. The defaults are the full demo (at most 10 minutes on two
    CPU cores); ``DemoConfig.quick()`` runs the same stages, arms and seeds with far fewer steps.
    """

    out_dir: Path = Path("runs/demo")
    seeds: tuple[int, ...] = (0, 1, 2)  # transfer stage seeds
    pool: tuple[PoolMember, ...] = DIGITS_POOL
    pool_seed: int = 0  # pretraining (init, order, views) and the store's views
    views: int = 8  # stored views per training image; view 0 is the eval view
    transfer_epochs: int = 8  # <= views: no stored target is seen twice
    transfer_lr: float = 1e-4  # Adam, constant, every arm: fine-tuning (3e-4 and 1e-3 drift)
    batch_size: int = 128
    augment: AugmentConfig = field(default_factory=_digits_augment)
    topk: int = 0  # stored classes per view: 0 (or >= the 10 classes) keeps every class, dense
    tail: str | None = None  # tail model of sparse targets; None: the dump's default rule
    tail_samples: int = 8  # draws per view of the sampled tail
    device: str = "auto"  # cuda when there is one
    backend: str = "auto"  # image pipeline: DALI when installed
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and at least one, got {self.seeds}")
        if len(self.pool) < 2:
            problems.append(f"the pool needs at least 2 members, got {len(self.pool)}")
        if min(self.views, self.transfer_epochs, self.batch_size) < 1:
            problems.append(
                f"views, transfer_epochs and batch_size must be >= 1, got "
                f"{self.views}, {self.transfer_epochs}, {self.batch_size}"
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

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """About a minute on two CPU cores: a sixth of the pretraining epochs, 2 stored views,
        1 transfer epoch. The pipeline, arms, seeds and report are the full demo's."""
        pool = tuple(replace(m, epochs=max(1, m.epochs // 6)) for m in DIGITS_POOL)
        settings: dict[str, Any] = {"pool": pool, "views": 2, "transfer_epochs": 1}
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def target_settings(self) -> dict[str, Any]:
        """What the dump is asked to keep of each member's logits (the store's cache key has it:
        stores of other settings live in other folders); ``tail_samples`` only where read."""
        samples = self.tail_samples if self.tail == "sampled" else None
        return {"topk": self.topk, "tail": self.tail, "tail_samples": samples}


def _key(*parts: Any) -> str:
    """Short hash of JSON-able settings: the name of a cache folder they fully determine."""
    text = json.dumps([fastkd.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_CHARS]


@dataclass(frozen=True)
class DemoLayout:
    """Where every artifact of a demo configuration lives under ``out_dir``."""

    out_dir: Path
    pool_key: str
    store_key: str
    transfer_key: str

    @classmethod
    def of(cls, cfg: DemoConfig) -> DemoLayout:
        pretraining = [
            [asdict(m) for m in cfg.pool],
            cfg.pool_seed,
            cfg.batch_size,
            asdict(cfg.augment),
        ]
        pool_key = _key("pool", IMAGE_SIZE, pretraining)
        store_key = _key(
            "store", pool_key, cfg.views, cfg.pool_seed, asdict(cfg.augment), cfg.target_settings()
        )
        transfer_key = _key("transfer", store_key, cfg.transfer_epochs, cfg.transfer_lr)
        return cls(cfg.out_dir, pool_key, store_key, transfer_key)

    @property
    def data(self) -> Path:
        return self.out_dir / "digits"

    @property
    def pool(self) -> Path:
        return self.out_dir / "pool" / self.pool_key

    @property
    def store(self) -> Path:
        return self.pool / f"store-{self.store_key}"

    def pretraining(self, member: str) -> Path:
        return self.pool / member

    def transfer(self, seed: int, arm: str) -> Path:
        return self.out_dir / "transfer" / self.transfer_key / f"seed-{seed}" / arm

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.out_dir)).as_posix()
