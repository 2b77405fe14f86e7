"""What the view loaders share: the per-config preprocessing, the item list, the batch plan.

A loader works through a flat list of (sample, view) items with their crop boxes and flips
(``fastkd.views.view_params``), cut into planned batches, and yields ``ViewBatch``es holding one
image tensor per timm data config. The backends (``fastkd.data.loader`` for torch,
``fastkd.data.dali`` for DALI, ``fastkd.data.nvjpeg`` for nvjpeg) crop the same integer pixel
box (``Items.pixel_boxes``), resize it per ``Preprocess``, take each file's bytes through the same
checks before decoding them (``Items.checked_bytes``: a cut or damaged file must never reach
DALI, see ``fastkd.data.wholeness``) and report unreadable files the same way
(``resolve_failures``); a ``LoadPlan`` is what the loader hands each one, and their work in
``DataLoader`` workers runs through ``worker_loader``. This module is that common ground, so no
backend imports another.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fastkd.choices import OnBadImage
from fastkd.data.datasets import ImageDataset
from fastkd.data.decoding import decode_rgb
from fastkd.data.wholeness import incomplete
from fastkd.errors import BadImageError, ConfigError, DatasetError, FastKDError, StorageError
from fastkd.storage.clients import fresh_process_context
from fastkd.views import pixel_box

log = logging.getLogger(__name__)

PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling
MAX_INPUT_SIDE = 16384  # px: a model input of more is a mistake (a batch of them fills memory)


@dataclass(frozen=True)
class Preprocess:
    """The part of a timm data config that turns a view's crop into a model input."""

    height: int
    width: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocess:
        missing = [key for key in ("input_size", "mean", "std") if key not in config]
        if missing:
            raise ConfigError(f"data config {dict(config)} has no {', '.join(missing)}")
        channels, height, width = (int(v) for v in config["input_size"])
        interpolation = str(config.get("interpolation", "bilinear"))
        if channels != 3:
            raise ConfigError(f"data config input_size {config['input_size']}: need 3 channels")
        if not (0 < height <= MAX_INPUT_SIDE and 0 < width <= MAX_INPUT_SIDE):
            raise ConfigError(
                f"data config input_size {config['input_size']}: each side in 1..{MAX_INPUT_SIDE}"
            )
        if interpolation not in PIL_RESAMPLE:
            raise ConfigError(
                f"data config interpolation {interpolation!r} is not supported for stored views; "
                f"use one of {sorted(PIL_RESAMPLE)}"
            )
        return cls(
            height=height,
            width=width,
            interpolation=interpolation,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )


@dataclass
class ViewBatch:
    """One batch of (sample, view) items and each data config's images of them."""

    samples: torch.Tensor  # int64 [b]
    views: torch.Tensor  # int64 [b]
    labels: torch.Tensor  # int64 [b]
    images: list[torch.Tensor]  # one float32 [b, 3, H, W] per data config, on the device
    file_hashes: np.ndarray  # int64 [b]: content hash of each file as it was read
    skipped: dict[int, str] = field(default_factory=dict)  # sample -> why, dropped from the batch


class Encoded(NamedTuple):
    """An item's encoded bytes as a backend may take them (``Items.checked_bytes``)."""

    data: bytes | None  # None: not to be decoded (``why``)
    why: str | None = None
    pil_only: bool = False  # not whole, yet PIL decodes it in full: never fed to DALI


def check_encoded(name: str, data: bytes) -> Encoded:
    """``data`` as a backend may take it: whole (``fastkd.data.wholeness``); not whole but
    decoded in full by PIL (``pil_only``); or refused, saying why. ``name``: the image in
    messages."""
    why = incomplete(data)
    if why is None:
        return Encoded(data)
    try:  # the full decode, only for the rare file the structure check doubts
        decode_rgb(name, data)
    except Exception:  # PIL raises many types for bad files: the structure says why
        return Encoded(None, why)
    return Encoded(data, pil_only=True)


@dataclass
class Items:
    """The flat item list a loader works through."""

    dataset: ImageDataset
    samples: np.ndarray  # int64 [n]
    views: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, 4] fractional (y0, x0, h, w)
    flips: np.ndarray  # bool [n]

    def name(self, position: int) -> str:
        """The item's image in messages: its file, or ``shard.tar:member``."""
        return self.dataset.name(int(self.samples[position]))

    def read(self, position: int) -> bytes:
        """The item's encoded image, wherever it lies (file or shard member)."""
        return self.dataset.read_bytes(int(self.samples[position]))

    def checked_bytes(self, position: int) -> Encoded:
        """The item's encoded image and whether it may be decoded, and by whom: refused (``why``)
        when its header is unreadable or refused (``ImageDataset.read_sizes``), the file cannot
        be read, or its bytes are not a whole image (``fastkd.data.wholeness``) that PIL does
        not decode in full either; ``pil_only`` when they are not whole yet PIL decodes them (a
        JPEG without its end marker): the torch backend decodes it as ever, DALI never sees it.
        Both backends ask this before decoding, so they take the same files."""
        return self.checked_batch([position])[0]

    def checked_batch(self, positions: Sequence[int] | np.ndarray) -> list[Encoded]:
        """``checked_bytes`` of a batch's items, their images read at once
        (``ImageDataset.read_many``: shards on object storage in a few concurrent ranged reads,
        not one request an image); a storage error that persists is raised, not skipped."""
        positions = [int(position) for position in positions]
        refused = {p: self._unreadable.get(int(self.samples[p])) for p in positions}
        wanted = [p for p in positions if refused[p] is None]
        read = dict(zip(wanted, self.dataset.read_many(self.samples[wanted]), strict=True))
        out = []
        for position in positions:
            data = read.get(position)
            if refused[position] is not None:
                out.append(Encoded(None, refused[position]))
            elif isinstance(data, OSError):
                out.append(Encoded(None, f"{type(data).__name__}: {data}"))
            else:
                out.append(check_encoded(self.name(position), data))
        return out

    @functools.cached_property
    def _unreadable(self) -> dict[int, str]:
        return self.dataset.read_sizes()[1]

    def pixel_boxes(self, positions: np.ndarray) -> np.ndarray:
        """int64 [b, 4] = (top, left, h, w): the integer crop every backend cuts."""
        sizes, _ = self.dataset.read_sizes()
        return np.array(
            [pixel_box(self.boxes[p], *sizes[self.samples[p]]) for p in positions],
            dtype=np.int64,
        ).reshape(len(positions), 4)

    def batch(
        self,
        positions: np.ndarray,
        images: list[torch.Tensor],
        skipped: dict,
        file_hashes: np.ndarray,
    ) -> ViewBatch:
        samples = self.samples[positions]
        return ViewBatch(
            samples=torch.from_numpy(samples),
            views=torch.from_numpy(self.views[positions]),
            labels=torch.from_numpy(self.dataset.labels[samples]),
            images=images,
            skipped=skipped,
            file_hashes=np.asarray(file_hashes, dtype=np.int64).reshape(len(positions)),
        )


@dataclass
class LoadPlan:
    """What a backend is asked to load: the items in their planned batches, the preprocessing
    per data config, the device the images land on and what to do with an unreadable image."""

    items: Items
    preps: list[Preprocess]
    batches: list[np.ndarray]  # item positions of each batch (``plan_batches``)
    device: torch.device
    on_bad_image: OnBadImage


def plan_batches(num_items: int, batch_size: int, breaks: Sequence[int] = ()) -> list[np.ndarray]:
    """Item positions of each batch: runs of ``batch_size`` that never straddle a break.

    With the breaks at block boundaries, a block's items always form the same batches, whatever
    else the run covers: a resumed dump feeds the models the very batches of an uninterrupted one.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    edges = sorted({0, num_items, *(b for b in breaks if 0 < b < num_items)})
    return [
        np.arange(start, min(start + batch_size, stop))
        for lo, stop in itertools.pairwise(edges)
        for start in range(lo, stop, batch_size)
    ]


def resolve_failures(
    items: Items, failed: Mapping[int, str], on_bad_image: OnBadImage
) -> dict[int, str]:
    """Item failures -> {sample: why}; raise ``BadImageError`` for the first unless skipping."""
    skipped: dict[int, str] = {}
    for position, reason in sorted(failed.items()):
        sample = int(items.samples[position])
        if on_bad_image == "fail":
            raise BadImageError(items.name(position), sample, reason)
        if sample not in skipped:
            log.warning("skipping unreadable image %s: %s", items.name(position), reason)
        skipped[sample] = reason
    return skipped


def worker_loader(
    source: torch.utils.data.Dataset, num_workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """The ``DataLoader`` of the work done in worker processes (the torch and nvjpeg backends,
    DALI's feeding): element ``j`` of ``source`` is planned batch ``j``, loaded whole in a worker
    and kept as the worker made it. Workers reading object storage are not forked from this
    process, which has used it (``fresh_process_context``: obstore does not survive a fork)."""
    items = getattr(source, "items", None)
    remote = num_workers > 0 and isinstance(items, Items) and items.dataset.is_remote
    return _WorkerLoader(
        source,
        batch_size=None,
        collate_fn=_as_loaded,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
        multiprocessing_context=fresh_process_context() if remote else None,
    )


class _WorkerLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose workers' storage and data set errors come back as they were
    raised: torch re-raises them with the worker's traceback in the message, which the CLI
    would print whole instead of its one line."""

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (StorageError, DatasetError) as error:
                raise _unwrapped(error) from None
            yield batch


def _unwrapped(error: FastKDError) -> FastKDError:
    """``error`` as its worker raised it (the traceback's last line), else as it is."""
    text = str(error)
    if "\nOriginal Traceback" not in text or isinstance(error, BadImageError):
        return error
    name = type(error).__name__
    lines = [line for line in text.splitlines() if line.split(": ", 1)[0].endswith(name)]
    if not lines:
        return error
    try:
        return type(error)(lines[-1].split(": ", 1)[1])
    except TypeError:  # an error class with its own arguments (ObjectChangedError): as it came
        return error


def _as_loaded(batch: Any) -> Any:
    """The DataLoader's collate: keep a loaded batch as it is (numpy positions stay numpy)."""
    return batch


def stack_views(
    planes: Sequence[Sequence[np.ndarray]], preps: Sequence[Preprocess]
) -> list[torch.Tensor]:
    """Per data config, its views (uint8 [3, H, W] each, ``load_view``) as one uint8 tensor
    [m, 3, H, W], empty [0, 3, H, W] when there are none: what a worker hands back."""
    return [
        torch.from_numpy(np.stack(plane))
        if plane
        else torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8)
        for plane, prep in zip(planes, preps, strict=True)
    ]


def load_view(
    path: str | Path,
    box: Sequence[int],
    flip: bool,
    preps: Sequence[Preprocess],
    data: bytes | None = None,
) -> list[np.ndarray]:
    """PIL: decode (``decode_rgb``; from ``data``, the image's bytes, when given: then ``path``
    only names it, e.g. a shard member), crop the pixel box, resize per data config, flip:
    uint8 [3, H, W] each."""
    from PIL import Image

    top, left, height, width = (int(v) for v in box)
    crop = decode_rgb(path, data).crop((left, top, left + width, top + height))
    out = []
    for prep in preps:
        resized = crop.resize((prep.width, prep.height), resample=PIL_RESAMPLE[prep.interpolation])
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    return out


def normalize(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 [b, 3, H, W] -> float32 ``(x - 255 mean) / (255 std)``, the formula DALI uses."""
    mean, std = _normalize_constants(prep, images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=64)
def _normalize_constants(prep: Preprocess, device: torch.device) -> tuple[torch.Tensor, ...]:
    """255 mean and 255 std of ``prep`` as [1, 3, 1, 1] tensors on ``device``: built (one small
    host-to-device copy each) once per data config and device, not every batch."""
    mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255
    return mean, std
