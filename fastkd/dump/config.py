"""What a dump is asked for (``DumpConfig``) and what its store will hold: the pool's classes
checked against the data set's, each member's manifest entry (dense, or top-k with its tail
model), the manifest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fastkd.augment import AugmentConfig
from fastkd.choices import Backend, OnBadImage
from fastkd.compression import DEFAULT_TAIL, MAX_TAIL_SAMPLES, TailModel, parse_tail
from fastkd.data import ImageDataset
from fastkd.dump.block_writer import DEFAULT_WRITE_QUEUE
from fastkd.errors import ConfigError
from fastkd.models import LoadedModel
from fastkd.storage import local_or_url
from fastkd.store import (
    Manifest,
    ModelEntry,
    resolve_topk,
)

log = logging.getLogger(__name__)
DEFAULT_TAIL_SAMPLES = 8  # draws per view of the sampled tail when --tail-samples is not given


@dataclass
class DumpConfig:
    """Everything a dump needs; the CLI only fills this in."""

    data: Path | str  # image folder, file list ("relative/path label" per line), tar shards (s3://)
    models: Sequence[str]  # "[alias:]NAME[=CKPT]" per pool member
    out: Path | str  # the store: a folder, or an s3:// URL
    views: int = 8  # stored views per sample; view 0 is the eval view
    topk: int = 10  # stored top-k classes per view (dense when that is about as small)
    tail: TailModel | None = None  # tail model of sparse targets; None: the default, dense if small
    tail_samples: int | None = None  # draws per view of the sampled tail (default 8)
    seed: int = 0  # view replay seed
    batch_size: int = 256  # (sample, view) items per forward
    backend: Backend = "auto"  # "dali", "nvjpeg", "torch"; auto: DALI, else nvjpeg on a GPU
    device: str | None = None  # default: cuda (cuda:LOCAL_RANK under torchrun) if present, else cpu
    part: str | None = None  # "i/n", this process's blocks; default torchrun's RANK/WORLD_SIZE
    overwrite: bool = False  # replace a store made with another configuration
    repair: bool = False  # verify this part's done blocks and rewrite the damaged ones
    on_bad_image: OnBadImage = "fail"  # or "skip": flag the sample in the store and carry on
    samples_per_shard: int | None = None  # samples per block (the unit of writing and resume)
    num_workers: int | None = None  # loader workers (DALI threads or DataLoader processes)
    data_root: Path | None = None  # root of a file list's paths (default: the list's folder)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    input_size: int | None = None  # every model's image side, over its data config's (manifest)
    amp: bool = True  # bf16 autocast on a GPU (CPU always runs fp32)
    progress: bool = True  # rich progress bar (on a terminal; a log line per block otherwise)
    write_queue: int = DEFAULT_WRITE_QUEUE  # blocks queued for the writer thread; 0: no thread

    def __post_init__(self) -> None:
        self.data, self.out = local_or_url(self.data), local_or_url(self.out)  # s3:// as given
        for name in ("views", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.write_queue < 0:
            raise ConfigError(
                f"--write-queue must be >= 0 (blocks waiting to be written while the next are "
                f"inferred; 0 writes each block before the next), got {self.write_queue}"
            )
        if self.topk < 0:
            raise ConfigError(f"--topk must be >= 0 (0 = store all logits), got {self.topk}")
        if self.tail is not None:
            self.tail = parse_tail(self.tail)
            if self.topk == 0:
                raise ConfigError(
                    f"--tail {self.tail.value} describes the classes outside a top-k, but --topk 0 "
                    "stores every class: give --topk K (K >= 1) or leave --tail out"
                )
        if self.tail_samples is not None:
            if self.tail is not TailModel.SAMPLED:
                given = self.tail.value if self.tail else f"(default: {DEFAULT_TAIL.value})"
                raise ConfigError(
                    f"--tail-samples {self.tail_samples} is for --tail sampled, got --tail {given}"
                )
            if not 1 <= self.tail_samples <= MAX_TAIL_SAMPLES:
                raise ConfigError(
                    f"--tail-samples must be in [1, {MAX_TAIL_SAMPLES}], got {self.tail_samples}"
                )
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"--input-size must be >= 1 (px), got {self.input_size}")
        if self.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"--on-bad-image must be 'fail' or 'skip', got {self.on_bad_image!r}")


def check_classes(
    dataset: ImageDataset, pool: Sequence[LoadedModel], data: Path | str
) -> None:
    """Every model must predict exactly the data set's classes."""
    for member in pool:
        if member.num_classes != dataset.num_classes:
            raise ConfigError(
                f"model {member.spec.name!r} ({member.spec.arch}) predicts {member.num_classes} "
                f"classes, but the data set {data} has {dataset.num_classes} "
                f"({_classes_text(dataset)}); a pool member must be trained on the data set's "
                "label set"
            )


def _classes_text(dataset: ImageDataset) -> str:
    """The first class names; for classes named by index, which sample has the largest label."""
    if dataset.classes:
        return ", ".join(dataset.classes[:5]) + (", ..." if dataset.num_classes > 5 else "")
    top = int(np.argmax(dataset.labels))
    return f"named by index; its largest label is {dataset.labels[top]}, of {dataset.name(top)}"


def model_entry(cfg: DumpConfig, member: LoadedModel) -> ModelEntry:
    """A pool member's manifest entry: how its targets are stored (dense, or top-k and tail)."""
    topk = resolve_topk(member.num_classes, cfg.topk, cfg.tail)
    tail = (cfg.tail or DEFAULT_TAIL) if topk else None
    if cfg.tail and not topk:
        log.warning(
            "model %r: --topk %d keeps all of its %d classes, so it is stored dense (no tail)",
            member.spec.name,
            cfg.topk,
            member.num_classes,
        )
    return ModelEntry(
        name=member.spec.name,
        arch=member.spec.arch,
        checkpoint_sha256=member.sha256,
        data_config=member.data_config,
        num_classes=member.num_classes,
        topk=topk,
        tail=tail.value if tail else None,
        tail_samples=(cfg.tail_samples or DEFAULT_TAIL_SAMPLES) if tail is TailModel.SAMPLED else 0,
    )


def build_manifest(cfg: DumpConfig, dataset: ImageDataset, pool: Sequence[LoadedModel]) -> Manifest:
    return Manifest(
        models=[model_entry(cfg, member) for member in pool],
        num_samples=len(dataset),
        views=cfg.views,
        seed=cfg.seed,
        augment=asdict(cfg.augment),
        fingerprint=dataset.fingerprint(),
        classes=dataset.classes,
        num_classes=dataset.num_classes,
    )
