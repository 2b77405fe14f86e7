"""The dump's work: its blocks planned, each block's batches inferred by every pool member and
written whole, then marked (``run_dump``), the writes in a thread of their own
(``block_writer``) while the next block is inferred; ``--repair`` finds the blocks to write
again."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastkd.data import (
    BadImageError,
    ImageDataset,
    ViewBatch,
    content_hashes,
    open_dataset,
    view_loader,
)
from fastkd.dump.block_writer import BackgroundWrites
from fastkd.dump.config import DumpConfig, build_manifest, check_classes
from fastkd.errors import DatasetError
from fastkd.hashing import UNRECORDED
from fastkd.input_size import announce_input
from fastkd.models import LoadedModel, fp32_classifier, load_model, parse_pool
from fastkd.runtime import (
    autocast,
    fast_memory_format,
    in_fast_layout,
    progress_bar,
    resolve_device,
)
from fastkd.store import (
    StoreWriter,
    check_store,
    resolve_part,
)
from fastkd.views import all_views

log = logging.getLogger(__name__)


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
            self.logits[member.spec.name][rows, views] = member_logits(member, images, device)

    def filled(self) -> _FilledBlock:
        """The finished block as the writer thread gets it: its logits copied to the host by a
        blocking ``.cpu()``, which on a GPU waits for the forwards that filled them (once a
        block; the writer then touches no device state: no stream, event or allocator shared
        across threads). The buffer is dropped after this, so nothing here changes again."""
        return _FilledBlock(
            block=self.block,
            samples=(self.start, self.stop),
            logits={name: logits.cpu() for name, logits in self.logits.items()},
            skipped=sorted(s - self.start for s in self.skipped),
            file_hashes=self.file_hashes,
        )


@dataclass(frozen=True)
class _FilledBlock:
    """A block ready to write: host logits per model, skipped offsets, file content hashes."""

    block: int
    samples: tuple[int, int]  # [start, stop)
    logits: dict[str, torch.Tensor]
    skipped: list[int]
    file_hashes: np.ndarray

    def write(self, writer: StoreWriter) -> None:
        with torch.inference_mode():  # as the logits were made (a thread's own setting)
            writer.write_block(
                self.block, self.logits, skipped=self.skipped, file_hashes=self.file_hashes
            )


def prepare_pool(pool: Sequence[LoadedModel], device: torch.device, amp: bool) -> None:
    """Each member as the dump runs it, in place: its classifier in fp32 (the stored numbers are
    fp32 computations whatever the backbone ran in; warned where a model has none), on
    ``device`` in its fast layout there. The benchmarks' ceiling runs the pool the same way."""
    for member in pool:
        if not fp32_classifier(member.model) and amp and device.type == "cuda":
            log.warning(
                "model %r has no timm classifier (get_classifier) to run in fp32: its logits, "
                "and so its stored targets, are only as precise as autocast's bf16",
                member.spec.name,
            )
        member.model.to(device, memory_format=fast_memory_format(device))


def member_logits(member: LoadedModel, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A prepared member's fp32 logits on a batch of its images (``prepare_pool``), under the
    caller's inference mode and autocast."""
    return member.model(in_fast_layout(images, device)).float()


def run_dump(cfg: DumpConfig, on_batch: Callable[[int], None] | None = None) -> Path | str:
    """Dump the pool's outputs on every (sample, view) of the data set into ``cfg.out``.

    Resumes an existing store with the same configuration; refuses one with another (unless
    ``overwrite``); checks everything it can (data set, models, classes) before touching it.
    Blocks are written by a thread while the next ones are inferred (``cfg.write_queue`` of
    them queued; 0 writes each in turn); it returns once every block is written.

    on_batch: called in this thread after each batch's forward passes with the number of
    (sample, view) items in the batch (0 for a batch of skipped images only), e.g. for a
    benchmark to time a steady state apart from the warm-up. The forwards may still run on the
    GPU then (they are queued, not waited for).
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
            _infer_blocks(cfg, writer, dataset, pool, plan, device, on_batch)
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
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Run the loader over the plan and the models over each batch; hand each block to the
    writer (thread) once the loader has moved past it (blocks with no readable image are written
    empty, all skipped), and return once every block is written."""
    prepare_pool(pool, device, cfg.amp)
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

    def write(filled: _FilledBlock) -> None:  # in the writer thread (write_queue > 0)
        nonlocal written
        filled.write(writer)
        start, stop = filled.samples
        written += (stop - start) * cfg.views
        log.info(
            "block %d written (samples %d-%d), %.0f img/s",
            filled.block, start, stop - 1, written / (time.perf_counter() - started),
        )  # fmt: skip

    description = "dump part {}/{}".format(*writer.part)
    with (
        progress_bar("img", enabled=cfg.progress) as bar,
        torch.inference_mode(),
        autocast(device, cfg.amp),
        BackgroundWrites(write, cfg.write_queue) as writes,  # joined before the store closes
    ):
        task = bar.add_task(description, total=len(plan.samples))
        group = next(by_block, None)
        for block in plan.blocks:
            buffer = _BlockBuffer(writer, block, pool, cfg.views, device, dataset)
            buffer.skipped.update(plan.unreadable[block])
            if group is not None and group[0] == block:
                for batch in group[1]:
                    buffer.add(batch, pool)
                    if on_batch is not None:
                        on_batch(len(batch.samples))
                    bar.advance(task, len(batch.samples))
                    writes.check()  # a failed write stops the dump at the next batch
                group = next(by_block, None)
            writes.submit(buffer.filled())
