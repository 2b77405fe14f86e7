"""``fastkd dump``: every pool member's outputs on every stored view, once, into the store.

The work is cut into the store's blocks (a run of samples, all their views, all models). A block
is fed to the models as a fixed sequence of batches (``data.plan_batches`` never lets a batch
straddle a block) and written whole, then marked done, by ``StoreWriter.write_block``. So a dump
killed at any point resumes with the blocks that carry no marker, feeds them the very batches an
uninterrupted run would have, and the finished store is bit for bit the same. Ranks (``--part
i/n``, or torchrun's RANK/WORLD_SIZE) each write their part, disjoint blocks of one store.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastkd.compression import DEFAULT_TAIL, MAX_TAIL_SAMPLES, TailModel, parse_tail
from fastkd.data import (
    Backend,
    BadImageError,
    ImageDataset,
    OnBadImage,
    ViewBatch,
    content_hashes,
    open_dataset,
    view_loader,
)
from fastkd.errors import ConfigError, DatasetError
from fastkd.hashing import UNRECORDED
from fastkd.input_size import announce_input
from fastkd.models import LoadedModel, fp32_classifier, load_model, parse_pool
from fastkd.runtime import autocast, progress_bar, resolve_device
from fastkd.store import (
    Manifest,
    ModelEntry,
    StoreWriter,
    check_store,
    resolve_part,
    resolve_topk,
)
from fastkd.views import AugmentConfig, all_views

log = logging.getLogger(__name__)
DEFAULT_TAIL_SAMPLES = 8  # draws per view of the sampled tail when --tail-samples is not given


@dataclass
class DumpConfig:
    """Everything a dump needs; the CLI only fills this in."""

    data: Path  # image folder, or a file list ("relative/path label" per line)
    models: Sequence[str]  # "[alias:]NAME[=CKPT]" per pool member
    out: Path  # the store
    views: int = 8  # stored views per sample; view 0 is the eval view
    topk: int = 10  # stored top-k classes per view (dense when that is about as small)
    tail: str | None = None  # tail model of sparse targets; None: the default, dense if small
    tail_samples: int | None = None  # draws per view of the sampled tail (default 8)
    seed: int = 0  # view replay seed
    batch_size: int = 256  # (sample, view) items per forward
    backend: Backend = "auto"  # "dali", "torch", or DALI when installed
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

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        for name in ("views", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.topk < 0:
            raise ConfigError(f"--topk must be >= 0 (0 = store all logits), got {self.topk}")
        if self.tail is not None:
            self.tail = parse_tail(self.tail).value
            if self.topk == 0:
                raise ConfigError(
                    f"--tail {self.tail} describes the classes outside a top-k, but --topk 0 "
                    "stores every class: give --topk K (K >= 1) or leave --tail out"
                )
        if self.tail_samples is not None:
            if self.tail != TailModel.SAMPLED.value:
                raise ConfigError(
                    f"--tail-samples {self.tail_samples} is for --tail sampled, got --tail "
                    f"{self.tail or '(default: ' + DEFAULT_TAIL.value + ')'}"
                )
            if not 1 <= self.tail_samples <= MAX_TAIL_SAMPLES:
                raise ConfigError(
                    f"--tail-samples must be in [1, {MAX_TAIL_SAMPLES}], got {self.tail_samples}"
                )
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"--input-size must be >= 1 (px), got {self.input_size}")
        if self.on_bad_image not in ("fail", "skip"):
            raise ConfigError(f"--on-bad-image must be 'fail' or 'skip', got {self.on_bad_image!r}")


def check_classes(dataset: ImageDataset, pool: Sequence[LoadedModel], data: Path) -> None:
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
    tail = parse_tail(cfg.tail or DEFAULT_TAIL) if topk else None
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


@dataclass
class _BlockPlan:
    """The (sample, view) items of the pending blocks, flattened in block, sample, view order."""

    blocks: list[int]
    samples: np.ndarray
    views: np.ndarray
    boxes: np.ndarray  # float32 [n, 4]
    flips: np.ndarray  # bool [n]
    breaks: list[int]  # item offsets where a block ends
    unreadable: dict[int, list[int]]  # block -> samples whose header could not be read


def plan_blocks(
    writer: StoreWriter,
    blocks: Sequence[int],
    sizes: np.ndarray,
    unreadable: Sequence[int],
    cfg: DumpConfig,
) -> _BlockPlan:
    """All views of every readable sample of ``blocks`` (``views.all_views``); ``blocks`` not empty."""
    bad = np.zeros(len(sizes), dtype=bool)
    bad[list(unreadable)] = True
    per_block, breaks, skipped = [], [], {}
    total = 0
    for block in blocks:
        start, stop = writer.block_range(block)
        samples = np.arange(start, stop)
        skipped[block] = samples[bad[start:stop]].tolist()
        samples = samples[~bad[start:stop]]
        per_block.append(all_views(cfg.seed, samples, cfg.views, sizes[samples], cfg.augment))
        total += samples.size * cfg.views
        breaks.append(total)
    return _BlockPlan(
        blocks=list(blocks),
        **{key: np.concatenate([rows[key] for rows in per_block]) for key in per_block[0]},
        breaks=breaks,
        unreadable=skipped,
    )


class _BlockBuffer:
    """One block's full logits per model, filled batch by batch, then written and marked done."""

    def __init__(
        self,
        writer: StoreWriter,
        block: int,
        pool: Sequence[LoadedModel],
        views: int,
        device: torch.device,
        dataset: ImageDataset,
    ):
        self.block = block
        self.dataset = dataset
        self.start, self.stop = writer.block_range(block)
        self.logits = {
            member.spec.name: torch.zeros(
                self.stop - self.start, views, member.num_classes, device=device
            )
            for member in pool
        }
        self.skipped: set[int] = set()
        self.file_hashes = np.zeros(self.stop - self.start, dtype=np.int64)

    def add(self, batch: ViewBatch, pool: Sequence[LoadedModel]) -> None:
        """Forward every model on its own preprocessing of the batch; keep fp32 logits and the
        content hash of every file read (each view reads its file again: all must agree)."""
        self.skipped.update(batch.skipped)
        if not len(batch.samples):
            return
        offsets = batch.samples.numpy() - self.start
        seen = self.file_hashes[offsets]
        changed = (seen != UNRECORDED) & (seen != batch.file_hashes)
        self.file_hashes[offsets] = batch.file_hashes
        # views of one sample in this batch: each must have read what the last one did
        changed |= self.file_hashes[offsets] != batch.file_hashes
        if changed.any():
            sample = int(batch.samples[np.flatnonzero(changed)[0]])
            raise DatasetError(
                f"image {self.dataset.name(sample)} (sample {sample}) changed while the dump read "
                "it: its views saw different bytes; run the dump again once the data is stable"
            )
        device = next(iter(self.logits.values())).device
        rows, views = (batch.samples - self.start).to(device), batch.views.to(device)
        for member, images in zip(pool, batch.images, strict=True):
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            self.logits[member.spec.name][rows, views] = member.model(images).float()

    def write(self, writer: StoreWriter) -> None:
        offsets = sorted(s - self.start for s in self.skipped)
        writer.write_block(self.block, self.logits, skipped=offsets, file_hashes=self.file_hashes)


def run_dump(cfg: DumpConfig) -> Path:
    """Dump the pool's outputs on every (sample, view) of the data set into ``cfg.out``.

    Resumes an existing store with the same configuration; refuses one with another (unless
    ``overwrite``); checks everything it can (data set, models, classes) before touching it.
    """
    part = resolve_part(cfg.part)
    device = resolve_device(cfg.device)
    dataset = open_dataset(cfg.data, root=cfg.data_root)
    # The models first: missing weights fail before the pass over every image's header.
    pool = [load_model(spec, input_size=cfg.input_size) for spec in parse_pool(cfg.models)]
    check_classes(dataset, pool, cfg.data)
    sizes, unreadable = dataset.read_sizes()
    if unreadable and cfg.on_bad_image == "fail":
        sample, reason = next(iter(unreadable.items()))
        raise BadImageError(dataset.name(sample), sample, reason)
    for member in pool:
        announce_input(member.spec.name, member.data_config, member.input_source, dataset)
    manifest = build_manifest(cfg, dataset, pool)

    with StoreWriter.create_or_resume(
        cfg.out,
        manifest,
        dataset.keys,
        dataset.labels,
        sizes,
        overwrite=cfg.overwrite,
        samples_per_shard=cfg.samples_per_shard,
        part=part,
    ) as writer:
        if cfg.repair:
            _mark_damaged_blocks(writer, cfg, dataset)
        pending = writer.pending_blocks()
        done = len(range(part[0], writer.num_blocks, part[1])) - len(pending)
        log.info(
            "dump %s -> %s: %d samples x %d views, %d models, part %d/%d: %d blocks to write, "
            "%d already done",
            cfg.data,
            cfg.out,
            len(dataset),
            cfg.views,
            len(pool),
            *part,
            len(pending),
            done,
        )
        if pending:
            plan = plan_blocks(writer, pending, sizes, list(unreadable), cfg)
            for samples in plan.unreadable.values():
                for sample in samples:
                    log.warning(
                        "skipping unreadable image %s: %s", dataset.name(sample), unreadable[sample]
                    )
            _infer_blocks(cfg, writer, dataset, pool, plan, device)
    log.info("dump finished: %s", cfg.out)
    return cfg.out


def _mark_damaged_blocks(writer: StoreWriter, cfg: DumpConfig, dataset: ImageDataset) -> None:
    """``--repair``: check every done block of this writer's part, its stored bytes and the
    files it was made from, and drop the markers of the damaged or outdated ones, so the dump
    rewrites exactly those."""
    i, n = writer.part
    done = sorted(set(range(i, writer.num_blocks, n)) - set(writer.pending_blocks()))
    bad = check_store(cfg.out, done, progress=cfg.progress)
    for problem in bad:
        log.warning("damaged: %s", problem.describe())
    blocks = {problem.block for problem in bad}
    outdated = _blocks_with_changed_files(writer, dataset, [b for b in done if b not in blocks])
    log.info(
        "repair: %d of %d written blocks damaged %s, %d made from files changed since %s",
        len(blocks), len(done), sorted(blocks), len(outdated), outdated,
    )  # fmt: skip
    writer.rewrite(sorted(blocks | set(outdated)))


def _blocks_with_changed_files(
    writer: StoreWriter, dataset: ImageDataset, blocks: list[int]
) -> list[int]:
    """The blocks (of intact ones) whose files' content now differs from what the dump read
    (an extra read of every file of those blocks: ``--repair`` only)."""
    outdated = []
    for block in blocks:
        start, _ = writer.block_range(block)
        recorded = writer.file_hashes(block)
        samples = [start + int(s) for s in np.flatnonzero(recorded != UNRECORDED)]
        now = content_hashes(dataset, samples)
        changed = [s for s, h in zip(samples, now, strict=True) if h != recorded[s - start]]
        for sample in changed:
            log.warning("changed since the dump: %s (block %d)", dataset.name(sample), block)
        if changed:
            outdated.append(block)
    return outdated


def _block_of(batch: ViewBatch, samples_per_block: int) -> int:
    """The block a batch belongs to (batches never straddle blocks; an empty one names skips)."""
    first = int(batch.samples[0]) if len(batch.samples) else min(batch.skipped)
    return first // samples_per_block


def _infer_blocks(
    cfg: DumpConfig,
    writer: StoreWriter,
    dataset: ImageDataset,
    pool: Sequence[LoadedModel],
    plan: _BlockPlan,
    device: torch.device,
) -> None:
    """Run the loader over the plan and the models over each batch; write each block once the
    loader has moved past it (blocks with no readable image are written empty, all skipped)."""
    on_gpu = device.type == "cuda"
    for member in pool:
        # The stored numbers are fp32 computations whatever the backbone ran in.
        if not fp32_classifier(member.model) and cfg.amp and on_gpu:
            log.warning(
                "model %r has no timm classifier (get_classifier) to run in fp32: its logits, "
                "and so its stored targets, are only as precise as autocast's bf16",
                member.spec.name,
            )
        member.model.to(
            device, memory_format=torch.channels_last if on_gpu else torch.preserve_format
        )
    batches = view_loader(
        dataset,
        plan.samples,
        plan.views,
        plan.boxes,
        plan.flips,
        [member.data_config for member in pool],
        batch_size=cfg.batch_size,
        breaks=plan.breaks,
        backend=cfg.backend,
        num_workers=cfg.num_workers,
        device=device,
        on_bad_image=cfg.on_bad_image,
    )
    by_block = itertools.groupby(
        batches, key=lambda b: _block_of(b, writer.layout.samples_per_shard)
    )
    started, written = time.perf_counter(), 0
    description = "dump part {}/{}".format(*writer.part)
    with (
        progress_bar("img", enabled=cfg.progress) as bar,
        torch.inference_mode(),
        autocast(device, cfg.amp),
    ):
        task = bar.add_task(description, total=len(plan.samples))
        group = next(by_block, None)
        for block in plan.blocks:
            buffer = _BlockBuffer(writer, block, pool, cfg.views, device, dataset)
            buffer.skipped.update(plan.unreadable[block])
            if group is not None and group[0] == block:
                for batch in group[1]:
                    buffer.add(batch, pool)
                    bar.advance(task, len(batch.samples))
                group = next(by_block, None)
            buffer.write(writer)
            written += (buffer.stop - buffer.start) * cfg.views
            log.info(
                "block %d written (samples %d-%d), %.0f img/s",
                block,
                buffer.start,
                buffer.stop - 1,
                written / (time.perf_counter() - started),
            )
