"""The DALI backend of ``fastkd.data.view_loader``: stored views decoded and preprocessed by DALI.

The encoded bytes come in through ``fn.external_source`` (in item order, with the crop window and
flip as per-sample argument inputs), are decoded once per view by ``fn.decoders.image_slice``
(``"mixed"`` on a GPU, which decodes only the crop window where the format allows; ``"cpu"``
without one), and every data config gets its own ``fn.resize`` + ``fn.crop_mirror_normalize`` of
that one decoded crop. ``external_source`` rather than ``fn.readers.file``: the order, the batch
boundaries and the set of files are then ours (a reader pads, shards and reorders on its own
terms), and a file that cannot be read or decoded is found and dropped without losing the rest.

Its own module because it is the one place that imports ``nvidia.dali`` (lazily, inside the
functions), and its recovery from a failed batch is its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fastkd.data.batches import Items, LoadPlan, Preprocess, ViewBatch, resolve_failures
from fastkd.data.decoding import decode_rgb
from fastkd.hashing import content_hash


class _EncodedSource:
    """``fn.external_source`` iterable: per planned batch the encoded files, crops and flips.

    A file that cannot be read, or whose header the data set found unreadable or refused (a
    mode ``fastkd.data.decoding`` has no rule for, which DALI might decode its own way), is fed
    as zero bytes, so it fails in the decoder like a corrupt one and takes the same recovery path.
    """

    def __init__(self, items: Items, batches: Sequence[np.ndarray]):
        self.items, self.batches = items, batches
        self.unreadable = set(items.dataset.read_sizes()[1])
        self.hashes: dict[int, int] = {}  # item position -> content hash of the bytes fed

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        items = self.items
        for positions in self.batches:
            encoded = [self._encoded(position) for position in positions]
            boxes = items.pixel_boxes(positions).astype(np.int32)
            yield (
                encoded,
                list(boxes[:, :2]),  # (top, left): slice start along (H, W)
                list(boxes[:, 2:]),  # (h, w): slice shape
                [np.int32(flip) for flip in items.flips[positions]],
            )

    def _encoded(self, position: int) -> np.ndarray:
        if int(self.items.samples[position]) not in self.unreadable:
            try:
                data = self.items.read(position)  # a file, or a shard member by offset
            except OSError:
                pass
            else:
                self.hashes[int(position)] = content_hash(data)
                return np.frombuffer(data, dtype=np.uint8)
        return np.zeros(0, dtype=np.uint8)

    def hashes_of(self, positions: np.ndarray) -> np.ndarray:
        """The content hashes of the files fed for these items (decoded, so all were read)."""
        return np.asarray([self.hashes.pop(int(p)) for p in positions], dtype=np.int64)


def _build_dali_pipeline(
    source: _EncodedSource,
    preps: list[Preprocess],
    batch_size: int,
    num_threads: int,
    device: torch.device,
) -> Any:
    """External source -> decode the crop window -> per data config resize + flip + normalise."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device.type == "cuda"
    interp = {
        "nearest": types.INTERP_NN,
        "bilinear": types.INTERP_LINEAR,
        "bicubic": types.INTERP_CUBIC,
        "lanczos": types.INTERP_LANCZOS3,
    }

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=_cuda_index(device) if on_gpu else None,
        prefetch_queue_depth=2,
    )
    def pipeline() -> tuple[Any, ...]:
        encoded, start, shape, flip = fn.external_source(
            source=source, num_outputs=4, batch=True, cycle=False
        )
        crops = fn.decoders.image_slice(
            encoded,
            start=start,
            shape=shape,
            axis_names="HW",
            device="mixed" if on_gpu else "cpu",
            output_type=types.RGB,
            adjust_orientation=False,  # as PIL and torchvision: header sizes are pre-EXIF
            jpeg_fancy_upsampling=True,  # libjpeg's default, which PIL uses
        )
        return tuple(
            fn.crop_mirror_normalize(
                fn.resize(
                    crops,
                    size=[prep.height, prep.width],
                    interp_type=interp[prep.interpolation],
                    antialias=True,
                ),
                mirror=flip,
                mean=[255 * m for m in prep.mean],
                std=[255 * s for s in prep.std],
                output_layout="CHW",
                dtype=types.FLOAT,
            )
            for prep in preps
        )

    pipe = pipeline()
    pipe.build()
    return pipe


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _to_torch(output: Any, device: torch.device) -> torch.Tensor:
    """A DALI batch (CPU or GPU) -> a torch tensor on ``device``, copied once."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = output.as_tensor()
    target = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, target, cuda_stream=stream)
    return target


def _decode_error(items: Items, position: int) -> str | None:
    """Why the torch backend's decoding (``decode_rgb``) fails on an item's image, or None: the
    same reason either backend reports."""
    try:
        decode_rgb(items.name(position), items.read(position))
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"
    return None


def dali_batches(plan: LoadPlan, batch_size: int, num_threads: int) -> Iterator[ViewBatch]:
    """Run the pipeline over the plan's batches. DALI fails a whole batch on one bad file: the
    failing batch's files are then checked one by one with PIL, the bad ones reported (``fail``)
    or dropped (``skip``), and a fresh pipeline resumes from that batch."""
    items, preps, device, on_bad_image = plan.items, plan.preps, plan.device, plan.on_bad_image
    todo = list(plan.batches)
    skipped_in_first: dict[int, str] = {}  # what was dropped from todo[0] after a failure
    while todo:
        source = _EncodedSource(items, todo)
        pipe = _build_dali_pipeline(source, preps, batch_size, num_threads, device)
        for done, positions in enumerate(todo):
            skipped = skipped_in_first if done == 0 else {}
            try:
                outputs = pipe.run()
            except RuntimeError as error:
                failed = {int(p): _decode_error(items, p) for p in positions}
                failed = {p: why for p, why in failed.items() if why is not None}
                if not failed:
                    names = [items.name(p) for p in positions]
                    raise RuntimeError(
                        f"DALI cannot decode a batch that PIL decodes in full ({names[:4]}...); "
                        f"use --backend torch. DALI said: {error}"
                    ) from error
                skipped = {**skipped, **resolve_failures(items, failed, on_bad_image)}
                kept = np.asarray([p for p in positions if int(p) not in failed], dtype=np.int64)
                if kept.size:
                    todo, skipped_in_first = [kept, *todo[done + 1 :]], skipped
                else:  # nothing left to decode in this batch
                    yield items.batch(
                        kept, _empty_images(preps, device), skipped, np.zeros(0, np.int64)
                    )
                    todo, skipped_in_first = todo[done + 1 :], {}
                break
            images = [_to_torch(o, device) for o in outputs]
            yield items.batch(positions, images, skipped, source.hashes_of(positions))
        else:
            todo = []
        del pipe


def _empty_images(preps: Sequence[Preprocess], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(0, 3, prep.height, prep.width, device=device) for prep in preps]
