"""The DALI backend of ``fastkd.data.view_loader``: stored views decoded and preprocessed by DALI.

The encoded bytes come in through ``fn.external_source`` (in item order, with the crop window and
flip as per-sample argument inputs), are decoded once per view by ``fn.decoders.image_slice``
(``"mixed"`` on a GPU, which decodes only the crop window where the format allows; ``"cpu"``
without one), and every data config gets its own ``fn.resize`` + ``fn.crop_mirror_normalize`` of
that one decoded crop. ``external_source`` rather than ``fn.readers.file``: the order, the batch
boundaries and the set of files are then ours (a reader pads, shards and reorders on its own
terms), and a file that cannot be read or decoded is found and dropped without losing the rest.

No file DALI might fail on is fed to it if it can be told beforehand: DALI 2.4 crashes the whole
process (a segmentation fault in its prefetch threads) on some cut PNGs, and decodes cut JPEGs
without a word when the crop lies before the cut. A file whose header the data set could not
read, that cannot be read or that is not whole (``Items.checked_bytes``) is fed as a 1 x 1
placeholder image and its rows are dropped from the outputs, or, where PIL decodes it in full
anyway (``pil_only``), filled with PIL's view of it, as the torch backend decodes it; only a
whole file DALI still fails on takes the recovery path (PIL file by file, a fresh pipeline).

DALI calls a plain ``external_source`` from the thread that runs the pipeline: the main thread,
which on a GPU must also drive the pool's forward. So the reading, checking and hashing happen
ahead in ``DataLoader`` worker processes (``_Feeder``, ``batches.worker_loader``, as the torch and
nvjpeg backends load), which hand each planned batch over whole, in one shared-memory tensor,
and the source only passes it on (``no_copy``): a few milliseconds of the main thread a batch
instead of every file's read, check and hash (docs/throughput.md has the figures). Rather than
DALI's parallel external source: the hashes, the reasons and PIL's
bytes then stay plain Python values in the main process, with no side channel for them.

Its own module because it is the one place that imports ``nvidia.dali`` (lazily, inside the
functions), and its recovery from a failed batch is its own.
"""

from __future__ import annotations

import collections
import functools
import io
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from fastkd.data.batches import (
    Items,
    LoadPlan,
    Preprocess,
    ViewBatch,
    load_view,
    normalize,
    resolve_failures,
    worker_loader,
)
from fastkd.data.decoding import decode_rgb
from fastkd.hashing import content_hash

PREFETCH = 2  # batches DALI asks its source for ahead of the one it runs


class _Fed(NamedTuple):
    """One planned batch made ready for DALI in a worker (``_Feeder``): what DALI is fed, and
    what the main process keeps of it until that batch's outputs are in."""

    encoded: torch.Tensor  # uint8: the items' bytes (or placeholders) end to end
    ends: np.ndarray  # int64 [b]: where each item's bytes end in ``encoded``
    boxes: np.ndarray  # int32 [b, 4] (top, left, h, w): a placeholder's is (0, 0, 1, 1)
    flips: np.ndarray  # int32 [b], 1: flip; a placeholder's is 0
    hashes: dict[int, int]  # item position -> content hash of the bytes read
    failed: dict[int, str]  # item position -> why its placeholder was fed
    by_pil: dict[int, bytes]  # item position -> bytes PIL decodes instead of DALI


class _Feeder(torch.utils.data.Dataset):
    """Element ``j`` is planned batch ``j`` as DALI is fed it, made in a ``DataLoader`` worker:
    each file read, checked (``Items.checked_bytes``) and hashed there, not in the thread that
    runs the pipeline and the models. A file that fails the check never reaches DALI: its slot
    gets the placeholder (``_placeholder``, cropped 1 x 1, not flipped) and ``failed`` says why;
    one PIL alone decodes (``pil_only``) gets it too, its bytes in ``by_pil``."""

    def __init__(self, items: Items, batches: Sequence[np.ndarray]):
        self.items, self.batches = items, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> _Fed:
        items, positions = self.items, self.batches[index]
        boxes = items.pixel_boxes(positions).astype(np.int32)
        flips = items.flips[positions].astype(np.int32)
        chunks: list[np.ndarray] = []
        hashes: dict[int, int] = {}
        failed: dict[int, str] = {}
        by_pil: dict[int, bytes] = {}
        checked = items.checked_batch(positions)  # read together: one batch of requests
        for row, (position, (data, why, pil_only)) in enumerate(
            zip(positions.tolist(), checked, strict=True)
        ):
            if data is not None:
                hashes[position] = content_hash(data)
            if data is None or pil_only:  # DALI never sees it
                if data is None:
                    failed[position] = why
                else:
                    by_pil[position] = data
                boxes[row], flips[row] = (0, 0, 1, 1), 0
                chunks.append(_placeholder())
            else:
                chunks.append(np.frombuffer(data, dtype=np.uint8))
        return _Fed(
            encoded=torch.from_numpy(np.concatenate(chunks)),  # one tensor: shared memory
            ends=np.cumsum([chunk.size for chunk in chunks], dtype=np.int64),
            boxes=boxes,
            flips=flips,
            hashes=hashes,
            failed=failed,
            by_pil=by_pil,
        )


class _EncodedSource:
    """``fn.external_source`` iterable: per planned batch the encoded files, crops and flips,
    as the ``_Feeder``'s workers made them, so the thread that runs the pipeline only hands
    them on. DALI asks for batches ahead by its prefetch depth, so what was fed is kept by item
    position until that batch's outputs are in."""

    def __init__(self, items: Items, batches: Sequence[np.ndarray], num_workers: int):
        items.dataset.read_sizes()  # the headers, read once here: the workers inherit them
        # The workers start now, before DALI's threads, and the bytes stay on the host (unpinned)
        loader = worker_loader(_Feeder(items, batches), num_workers, torch.device("cpu"))
        self._fed = iter(loader)
        self.hashes: dict[int, int] = {}  # item position -> content hash of the bytes fed
        self.failed: dict[int, str] = {}  # item position -> why its placeholder was fed
        self.by_pil: dict[int, bytes] = {}  # item position -> bytes PIL decodes instead of DALI

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        # fed with no_copy (no second copy of every file in this thread): DALI reads each
        # batch's arrays until PREFETCH iterations after feeding it, so they are kept longer
        alive: collections.deque[_Fed] = collections.deque(maxlen=PREFETCH + 2)
        for fed in self._fed:
            alive.append(fed)
            self.hashes |= fed.hashes
            self.failed |= fed.failed
            self.by_pil |= fed.by_pil
            flat, ends = fed.encoded.numpy(), fed.ends.tolist()
            yield (
                [flat[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)],
                list(fed.boxes[:, :2]),  # (top, left): slice start along (H, W)
                list(fed.boxes[:, 2:]),  # (h, w): slice shape
                [fed.flips[row, ...] for row in range(fed.flips.size)],  # 0-d views
            )

    def not_fed(self, positions: np.ndarray) -> dict[int, str]:
        """{position: why} of a batch's items whose placeholder was fed (their rows to drop)."""
        return {int(p): self.failed.pop(int(p)) for p in positions if int(p) in self.failed}

    def for_pil(self, positions: np.ndarray) -> dict[int, bytes]:
        """{position: bytes} of a batch's items that PIL decodes in their placeholders' rows."""
        return {int(p): self.by_pil.pop(int(p)) for p in positions if int(p) in self.by_pil}

    def hashes_of(self, positions: np.ndarray) -> np.ndarray:
        """The content hashes of the files fed for these items (decoded, so all were read)."""
        return np.asarray([self.hashes.pop(int(p)) for p in positions], dtype=np.int64)


@functools.cache
def _placeholder() -> np.ndarray:
    """A whole 1 x 1 PNG: what DALI decodes in the slot of a file it must not see."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


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
        prefetch_queue_depth=PREFETCH,
    )
    def pipeline() -> tuple[Any, ...]:
        encoded, start, shape, flip = fn.external_source(
            source=source, num_outputs=4, batch=True, cycle=False, no_copy=True
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


def _decode_with_pil(
    items: Items,
    preps: Sequence[Preprocess],
    positions: np.ndarray,
    encoded: dict[int, bytes],
    images: list[torch.Tensor],
) -> None:
    """Fill the rows of items DALI must not see but PIL decodes in full (``pil_only``) with the
    torch backend's views of them, in place."""
    for row, position in enumerate(positions.tolist()):
        if position not in encoded:
            continue
        box = items.pixel_boxes(np.asarray([position]))[0]
        views = load_view(
            items.name(position), box, items.flips[position], preps, encoded[position]
        )
        for image, view, prep in zip(images, views, preps, strict=True):
            image[row] = normalize(torch.from_numpy(view)[None].to(image.device), prep)[0]


def _decode_error(items: Items, position: int) -> str | None:
    """Why the torch backend fails on an item's image (``checked_bytes``, then PIL's decoding by
    ``decode_rgb``), or None: the same reason either backend reports."""
    data, why, _ = items.checked_bytes(position)
    if data is None:
        return why
    try:
        decode_rgb(items.name(position), data)
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"
    return None


def split_workers(workers: int) -> tuple[int, int]:
    """(DALI threads, ``DataLoader`` workers) out of the loader's ``workers``. DALI's threads
    decode, crop and resize, most of the work: they keep all ``workers``. Feeding (read, check,
    hash) costs a small fraction of that per image, and a feeder sleeps once its prefetch is
    full: one per 8 threads (at least one, so the main thread never feeds) beside them costs
    little (docs/throughput.md has the measured split)."""
    workers = max(1, workers)
    return workers, max(1, workers // 8)


def dali_batches(plan: LoadPlan, batch_size: int, workers: int) -> Iterator[ViewBatch]:
    """Run the pipeline over the plan's batches; the rows of items DALI was not fed (their
    placeholders) are dropped and reported (``fail``) or skipped (``skip``). DALI fails a whole
    batch on one bad file: the failing batch's files are then checked one by one with PIL, the
    bad ones reported or dropped likewise, and a fresh pipeline resumes from that batch.
    ``workers``: DALI's threads and the feeding ``DataLoader``'s processes (``split_workers``)."""
    items, preps, device, on_bad_image = plan.items, plan.preps, plan.device, plan.on_bad_image
    num_threads, feeders = split_workers(workers)
    todo = list(plan.batches)
    skipped_in_first: dict[int, str] = {}  # what was dropped from todo[0] after a failure
    while todo:
        source = _EncodedSource(items, todo, feeders)
        pipe = _build_dali_pipeline(source, preps, batch_size, num_threads, device)
        for done, positions in enumerate(todo):
            skipped = skipped_in_first if done == 0 else {}
            try:
                outputs = pipe.run()
            except RuntimeError as error:
                failed = source.not_fed(positions)
                fed = [int(p) for p in positions if int(p) not in failed]
                found = {p: _decode_error(items, p) for p in fed}
                found = {p: why for p, why in found.items() if why is not None}
                if not found:  # DALI failed on files that PIL decodes
                    names = [items.name(p) for p in positions]
                    raise RuntimeError(
                        f"DALI cannot decode a batch that PIL decodes in full ({names[:4]}...); "
                        f"use --backend torch. DALI said: {error}"
                    ) from error
                failed |= found
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
            _decode_with_pil(items, preps, positions, source.for_pil(positions), images)
            failed = source.not_fed(positions)
            if failed:
                skipped = {**skipped, **resolve_failures(items, failed, on_bad_image)}
                rows = np.asarray([int(p) not in failed for p in positions])
                index = torch.from_numpy(np.flatnonzero(rows)).to(device)
                images = [image.index_select(0, index) for image in images]
                positions = positions[rows]
            yield items.batch(positions, images, skipped, source.hashes_of(positions))
        else:
            todo = []
        del pipe


def _empty_images(preps: Sequence[Preprocess], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(0, 3, prep.height, prep.width, device=device) for prep in preps]
