"""Data sets and the loaders that replay stored views, preprocessed for every model of a pool.

A data set is an image folder (class subfolders, sorted, as torchvision's ``ImageFolder``) or a
file list (``relative/path label`` per line). Samples are identified by their key, the path
relative to the data root; the fingerprint hashes the sorted (key, file size) pairs, so a store
can refuse a data set that gained, lost, renamed or rewrote a file.

The loaders turn a list of (sample, view) items with their crop boxes and flips
(``fastkd.views.view_params``) into batches holding one image tensor per timm data config. Both
backends do the same thing in the same order: decode, crop the view's integer pixel box
(``views.pixel_box``), resize the crop to the config's input size with its interpolation, flip,
normalise. The crop is the same integer box in both; the resize kernels differ slightly (DALI's
resampling vs PIL's), so the two backends agree to within a few grey levels, not bit for bit.

- ``backend="dali"``: an NVIDIA DALI pipeline. The encoded bytes come in through
  ``fn.external_source`` (in item order, with the crop window and flip as per-sample argument
  inputs), are decoded once per view by ``fn.decoders.image_slice`` (``"mixed"`` on a GPU, which
  decodes only the crop window where the format allows; ``"cpu"`` without one), and every data
  config gets its own ``fn.resize`` + ``fn.crop_mirror_normalize`` of that one decoded crop.
  ``external_source`` rather than ``fn.readers.file``: the order, the batch boundaries and the set
  of files are then ours (a reader pads, shards and reorders on its own terms), and a file that
  cannot be read or decoded is found and dropped without losing the rest.
- ``backend="torch"``: a torch ``DataLoader`` whose workers load whole batches with PIL.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastkd.views import pixel_box

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
Backend = Literal["auto", "dali", "torch"]
OnBadImage = Literal["fail", "skip"]
_IO_THREADS = 16  # header reads and stats are I/O bound: more threads than cores


class DatasetError(ValueError):
    """A data set that cannot be used (the message names the file or line)."""


class BadImageError(DatasetError):
    """An image that cannot be read or decoded."""

    def __init__(self, path: Path, sample: int, reason: str) -> None:
        super().__init__(
            f"cannot read image {path} (sample {sample}): {reason}. "
            "Fix or remove the file, or skip unreadable images (--on-bad-image skip)."
        )
        self.path = path
        self.sample = sample
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Data sets


@dataclass
class ImageDataset:
    """Samples of an image folder or a file list; ``keys`` are paths relative to ``root``."""

    root: Path
    keys: list[str]
    labels: np.ndarray  # int64 [n]
    classes: list[str]
    file_sizes: np.ndarray = field(repr=False)  # int64 [n] bytes
    _sizes: np.ndarray | None = field(default=None, repr=False)
    _unreadable: dict[int, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, sample: int) -> Path:
        return self.root / self.keys[sample]

    def fingerprint(self) -> str:
        """sha256 over the sorted (key, file size) pairs."""
        digest = hashlib.sha256()
        for key, size in sorted(zip(self.keys, self.file_sizes.tolist(), strict=True)):
            digest.update(f"{key}\t{size}\n".encode())
        return digest.hexdigest()

    @property
    def sizes(self) -> np.ndarray:
        """int64 [n, 2] image (height, width) from the file headers; any unreadable one fails."""
        sizes, unreadable = self.read_sizes()
        if unreadable:
            sample, reason = next(iter(unreadable.items()))
            raise BadImageError(self.path(sample), sample, reason)
        return sizes

    def read_sizes(self) -> tuple[np.ndarray, dict[int, str]]:
        """(sizes int64 [n, 2], {sample: error} of headers that cannot be read).

        Headers only (PIL opens lazily), in threads; read once and cached. Unreadable images get
        the placeholder size (1, 1): they have no pixels to crop and are never fed to a model.
        """
        if self._sizes is None:
            with ThreadPoolExecutor(_IO_THREADS) as pool:
                results = list(pool.map(_header_size, map(self.path, range(len(self)))))
            sizes = np.ones((len(self), 2), dtype=np.int64)
            for sample, (size, error) in enumerate(results):
                if error is None:
                    sizes[sample] = size
                else:
                    self._unreadable[sample] = error
            self._sizes = sizes
        return self._sizes, dict(self._unreadable)


def _header_size(path: Path) -> tuple[tuple[int, int], str | None]:
    """((height, width), None) from the image header, or ((1, 1), error)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as error:  # PIL raises many types for bad files
        return (1, 1), f"{type(error).__name__}: {error}"
    if width < 1 or height < 1:
        return (1, 1), f"empty image ({width}x{height})"
    return (height, width), None


def _file_sizes(paths: Sequence[Path], where: Sequence[str]) -> np.ndarray:
    """Byte sizes of files (threads); a missing file is an error naming ``where`` it was listed."""
    with ThreadPoolExecutor(_IO_THREADS) as pool:
        results = list(pool.map(_stat_size, paths))
    for size, path, origin in zip(results, paths, where, strict=True):
        if size < 0:
            raise DatasetError(f"{origin}: image {path} does not exist or is not a file")
    return np.asarray(results, dtype=np.int64)


def _stat_size(path: Path) -> int:
    try:
        stat = path.stat()
    except OSError:
        return -1
    return stat.st_size if os.path.isfile(path) else -1


def open_dataset(path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> ImageDataset:
    """An image folder (``path/<class>/**/<image>``) or a file list (``path`` is a text file).

    A file list holds ``relative/path label`` per line (the path may contain spaces; blank lines
    and ``#`` comments are skipped), relative to ``root`` or else to the list's folder; labels are
    class indices ``0..C-1`` and the classes are named by their index.
    """
    path = Path(path)
    if path.is_dir():
        if root is not None:
            raise DatasetError(f"--root is only for file lists; {path} is an image folder")
        return _open_image_folder(path)
    if path.is_file():
        return _open_file_list(path, Path(root) if root is not None else path.parent)
    raise DatasetError(f"data set {path} does not exist (expected an image folder or a file list)")


def _open_image_folder(root: Path) -> ImageDataset:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f"image folder {root} has no class subfolders (expected root/<class>/)")
    keys: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            subfolders.sort()
            relative = Path(folder).relative_to(root).as_posix()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    keys.append(f"{relative}/{file}")
                    labels.append(label)
    if not keys:
        raise DatasetError(
            f"image folder {root} has no images in its {len(classes)} class folders "
            f"(extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    empty = sorted(set(classes) - {classes[label] for label in labels})
    if empty:
        log.warning("image folder %s: class folders without images: %s", root, empty[:10])
    paths = [root / key for key in keys]
    return ImageDataset(
        root=root,
        keys=keys,
        labels=np.asarray(labels, dtype=np.int64),
        classes=classes,
        file_sizes=_file_sizes(paths, [str(root)] * len(paths)),
    )


def _open_file_list(list_file: Path, root: Path) -> ImageDataset:
    keys: list[str] = []
    labels: list[int] = []
    origins: list[str] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{number}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DatasetError(f"{where}: expected 'relative/path label', got {raw!r}")
        key, label = Path(parts[0]).as_posix(), parts[1]
        if not label.isdigit():
            raise DatasetError(f"{where}: label {label!r} is not a class index (0, 1, 2, ...)")
        if Path(key).is_absolute() or ".." in Path(key).parts:
            raise DatasetError(f"{where}: path {key!r} must be relative to {root}, inside it")
        if key in seen:
            raise DatasetError(f"{where}: {key} is listed twice (first at {seen[key]})")
        seen[key] = where
        keys.append(key)
        labels.append(int(label))
        origins.append(where)
    if not keys:
        raise DatasetError(f"file list {list_file} lists no images")
    return ImageDataset(
        root=root,
        keys=keys,
        labels=np.asarray(labels, dtype=np.int64),
        classes=[str(c) for c in range(max(labels) + 1)],
        file_sizes=_file_sizes([root / key for key in keys], origins),
    )


# ----------------------------------------------------------------------------------------------
# Preprocessing per data config


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
        channels, height, width = (int(v) for v in config["input_size"])
        interpolation = str(config.get("interpolation", "bilinear"))
        if channels != 3:
            raise ValueError(f"data config input_size {config['input_size']}: need 3 channels")
        if interpolation not in _PIL_RESAMPLE:
            raise ValueError(
                f"data config interpolation {interpolation!r} is not supported for stored views; "
                f"use one of {sorted(_PIL_RESAMPLE)}"
            )
        return cls(
            height=height,
            width=width,
            interpolation=interpolation,
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )


_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling


def _normalize(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 [b, 3, H, W] -> float32 ``(x - 255 mean) / (255 std)``, the formula DALI uses."""
    mean = torch.tensor(prep.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep.std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


# ----------------------------------------------------------------------------------------------
# Loaders


@dataclass
class ViewBatch:
    """One batch of (sample, view) items and each data config's images of them."""

    samples: torch.Tensor  # int64 [b]
    views: torch.Tensor  # int64 [b]
    labels: torch.Tensor  # int64 [b]
    images: list[torch.Tensor]  # one float32 [b, 3, H, W] per data config, on the device
    skipped: dict[int, str] = field(default_factory=dict)  # sample -> why, dropped from the batch


@dataclass
class _Items:
    """The flat item list a loader works through."""

    dataset: ImageDataset
    samples: np.ndarray  # int64 [n]
    views: np.ndarray  # int64 [n]
    boxes: np.ndarray  # float32 [n, 4] fractional (y0, x0, h, w)
    flips: np.ndarray  # bool [n]

    def path(self, position: int) -> Path:
        return self.dataset.path(int(self.samples[position]))

    def pixel_boxes(self, positions: np.ndarray) -> np.ndarray:
        """int64 [b, 4] = (top, left, h, w): the integer crop both backends cut."""
        sizes, _ = self.dataset.read_sizes()
        return np.array(
            [pixel_box(self.boxes[p], *sizes[self.samples[p]]) for p in positions],
            dtype=np.int64,
        ).reshape(len(positions), 4)

    def batch(self, positions: np.ndarray, images: list[torch.Tensor], skipped: dict) -> ViewBatch:
        samples = self.samples[positions]
        return ViewBatch(
            samples=torch.from_numpy(samples),
            views=torch.from_numpy(self.views[positions]),
            labels=torch.from_numpy(self.dataset.labels[samples]),
            images=images,
            skipped=skipped,
        )


def plan_batches(num_items: int, batch_size: int, breaks: Sequence[int] = ()) -> list[np.ndarray]:
    """Item positions of each batch: runs of ``batch_size`` that never straddle a break.

    With the breaks at block boundaries, a block's items always form the same batches, whatever
    else the run covers: a resumed dump feeds the models the very batches of an uninterrupted one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    edges = sorted({0, num_items, *(b for b in breaks if 0 < b < num_items)})
    return [
        np.arange(start, min(start + batch_size, stop))
        for lo, stop in itertools.pairwise(edges)
        for start in range(lo, stop, batch_size)
    ]


def resolve_backend(backend: Backend) -> Literal["dali", "torch"]:
    """``auto``: DALI when it can be imported, else torch."""
    if backend not in ("auto", "dali", "torch"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    has_dali = importlib.util.find_spec("nvidia.dali") is not None
    if backend == "dali" and not has_dali:
        raise ValueError(
            "backend 'dali' needs NVIDIA DALI (pip install nvidia-dali-cuda130); use torch"
        )
    return "dali" if has_dali else "torch"


def view_loader(
    dataset: ImageDataset,
    samples: np.ndarray,
    views: np.ndarray,
    boxes: np.ndarray,
    flips: np.ndarray,
    data_configs: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    breaks: Sequence[int] = (),
    backend: Backend = "auto",
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    on_bad_image: OnBadImage = "fail",
) -> Iterator[ViewBatch]:
    """Batches of the given (sample, view) items, in order, preprocessed per data config.

    samples, views: int [n]; boxes: float [n, 4] fractional (y0, x0, h, w) and flips: bool [n],
    as ``views.view_params`` gives them. Batches hold ``batch_size`` items and never straddle a
    position in ``breaks`` (``plan_batches``). A file that cannot be read or decoded raises
    ``BadImageError`` (``on_bad_image="fail"``), or with ``"skip"`` its items are dropped and the
    batch's ``skipped`` names them (a batch may then be empty). Images land on ``device``.
    """
    samples = np.asarray(samples, dtype=np.int64)
    num_items = samples.shape[0]
    views, flips = np.asarray(views, dtype=np.int64), np.asarray(flips, dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float32)
    if views.shape != (num_items,) or flips.shape != (num_items,) or boxes.shape != (num_items, 4):
        raise ValueError(
            f"need samples, views, flips [n] and boxes [n, 4] for n={num_items} items, got "
            f"views {views.shape}, flips {flips.shape}, boxes {boxes.shape}"
        )
    if num_items and (samples.min() < 0 or samples.max() >= len(dataset)):
        raise ValueError(f"sample indices must be in [0, {len(dataset)}), got {samples.max()}")
    if on_bad_image not in ("fail", "skip"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if not data_configs:
        raise ValueError("need at least one data config")
    items = _Items(dataset, samples, views, boxes, flips)
    preps = [Preprocess.from_data_config(config) for config in data_configs]
    batches = plan_batches(num_items, batch_size, breaks)
    device = torch.device(device) if device is not None else torch.device("cpu")
    workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    if resolve_backend(backend) == "dali":
        return _dali_batches(
            items, preps, batches, batch_size, max(1, workers), device, on_bad_image
        )
    return _torch_batches(items, preps, batches, workers, device, on_bad_image)


# -- torch backend -----------------------------------------------------------------------------


def load_view(
    path: Path, box: Sequence[int], flip: bool, preps: Sequence[Preprocess]
) -> list[np.ndarray]:
    """PIL: decode, crop the pixel box, resize per data config, flip: uint8 [3, H, W] each."""
    from PIL import Image

    top, left, height, width = (int(v) for v in box)
    with Image.open(path) as image:
        crop = image.convert("RGB").crop((left, top, left + width, top + height))
    out = []
    for prep in preps:
        resized = crop.resize((prep.width, prep.height), resample=_PIL_RESAMPLE[prep.interpolation])
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))
    return out


class _BatchSource(torch.utils.data.Dataset):
    """Element ``j`` is planned batch ``j``, loaded whole in a worker (one message per batch)."""

    def __init__(self, items: _Items, preps: list[Preprocess], batches: list[np.ndarray]):
        self.items, self.preps, self.batches = items, preps, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[torch.Tensor], dict[int, str]]:
        items, positions = self.items, self.batches[index]
        kept: list[int] = []
        planes: list[list[np.ndarray]] = [[] for _ in self.preps]
        failed: dict[int, str] = {}
        for position, box in zip(positions, items.pixel_boxes(positions), strict=True):
            try:
                views = load_view(items.path(position), box, items.flips[position], self.preps)
            except Exception as error:  # PIL raises many types for bad files
                failed[int(position)] = f"{type(error).__name__}: {error}"
                continue
            kept.append(int(position))
            for plane, image in zip(planes, views, strict=True):
                plane.append(image)
        images = [
            torch.from_numpy(np.stack(plane))
            if plane
            else torch.empty(0, 3, prep.height, prep.width, dtype=torch.uint8)
            for plane, prep in zip(planes, self.preps, strict=True)
        ]
        return np.asarray(kept, dtype=np.int64), images, failed


def _as_loaded(batch: Any) -> Any:
    """The DataLoader's collate: keep a loaded batch as it is (numpy positions stay numpy)."""
    return batch


def _torch_batches(
    items: _Items,
    preps: list[Preprocess],
    batches: list[np.ndarray],
    num_workers: int,
    device: torch.device,
    on_bad_image: OnBadImage,
) -> Iterator[ViewBatch]:
    loader = torch.utils.data.DataLoader(
        _BatchSource(items, preps, batches),
        batch_size=None,
        collate_fn=_as_loaded,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers else None,
    )
    for kept, images, failed in loader:
        skipped = _resolve_failures(items, failed, on_bad_image)
        images = [
            _normalize(batch.to(device, non_blocking=True), prep)
            for batch, prep in zip(images, preps, strict=True)
        ]
        yield items.batch(kept, images, skipped)


def _resolve_failures(
    items: _Items, failed: Mapping[int, str], on_bad_image: OnBadImage
) -> dict[int, str]:
    """Item failures -> {sample: why}; raise ``BadImageError`` for the first unless skipping."""
    skipped: dict[int, str] = {}
    for position, reason in sorted(failed.items()):
        sample = int(items.samples[position])
        if on_bad_image == "fail":
            raise BadImageError(items.path(position), sample, reason)
        if sample not in skipped:
            log.warning("skipping unreadable image %s: %s", items.path(position), reason)
        skipped[sample] = reason
    return skipped


# -- DALI backend ------------------------------------------------------------------------------


class _EncodedSource:
    """``fn.external_source`` iterable: per planned batch the encoded files, crops and flips.

    A file that cannot be read is fed as zero bytes, so it fails in the decoder like a corrupt
    one and takes the same recovery path.
    """

    def __init__(self, items: _Items, batches: Sequence[np.ndarray]):
        self.items, self.batches = items, batches

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        items = self.items
        for positions in self.batches:
            encoded = []
            for position in positions:
                try:
                    encoded.append(np.fromfile(items.path(position), dtype=np.uint8))
                except OSError:
                    encoded.append(np.zeros(0, dtype=np.uint8))
            boxes = items.pixel_boxes(positions).astype(np.int32)
            yield (
                encoded,
                list(boxes[:, :2]),  # (top, left): slice start along (H, W)
                list(boxes[:, 2:]),  # (h, w): slice shape
                [np.int32(flip) for flip in items.flips[positions]],
            )


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


def _pil_error(path: Path) -> str | None:
    """Why PIL cannot fully decode an image, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"
    return None


def _dali_batches(
    items: _Items,
    preps: list[Preprocess],
    batches: list[np.ndarray],
    batch_size: int,
    num_threads: int,
    device: torch.device,
    on_bad_image: OnBadImage,
) -> Iterator[ViewBatch]:
    """Run the pipeline over ``batches``. DALI fails a whole batch on one bad file: the failing
    batch's files are then checked one by one with PIL, the bad ones reported (``fail``) or
    dropped (``skip``), and a fresh pipeline resumes from that batch."""
    todo = list(batches)
    skipped_in_first: dict[int, str] = {}  # what was dropped from todo[0] after a failure
    while todo:
        source = _EncodedSource(items, todo)
        pipe = _build_dali_pipeline(source, preps, batch_size, num_threads, device)
        for done, positions in enumerate(todo):
            skipped = skipped_in_first if done == 0 else {}
            try:
                outputs = pipe.run()
            except RuntimeError as error:
                failed = {int(p): _pil_error(items.path(p)) for p in positions}
                failed = {p: why for p, why in failed.items() if why is not None}
                if not failed:
                    names = [str(items.path(p)) for p in positions]
                    raise RuntimeError(
                        f"DALI cannot decode a batch that PIL reads in full ({names[:4]}...); "
                        f"use --backend torch. DALI said: {error}"
                    ) from error
                skipped = {**skipped, **_resolve_failures(items, failed, on_bad_image)}
                kept = np.asarray([p for p in positions if int(p) not in failed], dtype=np.int64)
                if kept.size:
                    todo, skipped_in_first = [kept, *todo[done + 1 :]], skipped
                else:  # nothing left to decode in this batch
                    yield items.batch(kept, _empty_images(preps, device), skipped)
                    todo, skipped_in_first = todo[done + 1 :], {}
                break
            yield items.batch(positions, [_to_torch(o, device) for o in outputs], skipped)
        else:
            todo = []
        del pipe


def _empty_images(preps: Sequence[Preprocess], device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(0, 3, prep.height, prep.width, device=device) for prep in preps]
