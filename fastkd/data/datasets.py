"""Data sets: an image folder, a file list or tar shards; their samples' keys, labels, sizes.

A data set is an image folder (class subfolders, sorted, as torchvision's ``ImageFolder``), a
file list (``relative/path label`` per line) or WebDataset tar shards (``fastkd.data.shards``).
Samples are identified by their key, the path relative to the data root (in shards: the
WebDataset key); the fingerprint hashes the sorted (key, file size) pairs, so a store can
refuse, on open, a data set that gained, lost, renamed or resized a file. What it cannot see, a
file rewritten at the same size, the loaders catch: they hash each file's bytes as they read
them (``ViewBatch.file_hashes``), and training compares those with the store's.

Where a sample's bytes come from is the data set's business: the loaders, the dump and training
read them with ``ImageDataset.read_bytes`` and name the image with ``ImageDataset.name`` (a
file's path, or ``shard.tar:member``), so a shard member is an image like a file everywhere.

Its own module because it knows nothing of views or loaders: a store, a dump and a training run
open data sets, and only the loaders (``fastkd.data.loader``) read their pixels. Reading the
headers also refuses the modes the decoding rule has none for (``fastkd.data.decoding``), so
every command treats them as unreadable images, whichever backend would load them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fastkd.data.decoding import IMAGE_EXTENSIONS, refusal
from fastkd.data.labels import parse_label
from fastkd.data.shard_members import ShardMembers
from fastkd.data.shards import expand_shards, index_shards, is_shard_spec
from fastkd.errors import BadImageError, DatasetError, ShardChangedError, StorageError
from fastkd.hashing import content_hash
from fastkd.storage.options import is_object_url

log = logging.getLogger(__name__)

_IO_THREADS = 16  # header reads and stats are I/O bound: more threads than cores
_REMOTE_HASH_BATCH = 256  # members of remote shards read at once to hash them (--repair)


@dataclass
class ImageDataset:
    """Samples of an image folder or a file list (``keys`` are paths relative to ``root``), or
    of tar shards (``members`` says where each image lies; ``root``: the shards' folder).

    ``num_classes``: labels are ``0..num_classes-1``. ``classes``: their names where the data
    has them (a folder's class folders); empty where classes are named by their index (file
    lists, shards), so no list is built from a label (``fastkd.data.labels``)."""

    root: Path | str  # a URL string for shards on object storage
    keys: list[str]
    labels: np.ndarray  # int64 [n]
    classes: list[str]
    num_classes: int
    file_sizes: np.ndarray = field(repr=False)  # int64 [n] bytes
    source: str = ""  # the data set as given (folder, file list, shard pattern); default: root
    members: ShardMembers | None = field(default=None, repr=False)  # tar shards only
    _sizes: np.ndarray | None = field(default=None, repr=False)
    _unreadable: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.source = self.source or str(self.root)

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, sample: int) -> Path:
        """The image file of a folder's or file list's sample (a shard member has none)."""
        if self.members is not None:
            raise TypeError(
                f"sample {sample} is a member of a tar shard ({self.name(sample)}), not a file: "
                "read it with read_bytes"
            )
        return self.root / self.keys[sample]

    @property
    def is_remote(self) -> bool:
        """Whether the images are on object storage (tar shards: ``ShardMembers.is_remote``)."""
        return self.members is not None and self.members.is_remote

    def name(self, sample: int) -> str:
        """What messages call the image: its file, or ``shard.tar:member``."""
        if self.members is not None:
            return self.members.name(sample)
        return str(self.path(sample))

    def read_bytes(self, sample: int) -> bytes:
        """The image's encoded bytes, as both loaders decode (and hash) them."""
        if self.members is not None:
            return self.members.read(sample)
        return self.path(sample).read_bytes()

    def read_many(self, samples: Sequence[int] | np.ndarray) -> list[bytes | OSError]:
        """``read_bytes`` of many samples, an ``OSError`` in place of an image that cannot be
        read: what a loader's batch reads (shards on object storage: at once, concurrently,
        ``ShardMembers.read_many``; errors of the storage itself are raised)."""
        if self.members is not None:
            return self.members.read_many(samples)
        out: list[bytes | OSError] = []
        for sample in samples:
            try:
                out.append(self.read_bytes(int(sample)))
            except OSError as error:
                out.append(error)
        return out

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
            raise BadImageError(self.name(sample), sample, reason)
        return sizes

    def median_side(self) -> float | None:
        """The median short side (px) of the readable images (None: none readable): what a
        model's input size is compared with to tell an upscaling one (``fastkd.input_size``)."""
        sizes, unreadable = self.read_sizes()
        readable = np.ones(len(sizes), dtype=bool)
        readable[list(unreadable)] = False
        if not readable.any():
            return None
        return float(np.median(sizes[readable].min(axis=1)))

    def read_sizes(self) -> tuple[np.ndarray, dict[int, str]]:
        """(sizes int64 [n, 2], {sample: error} of headers that cannot be read).

        Headers only (PIL opens lazily, a shard member as a file: ``ShardMembers.open``), in
        threads; read once and cached. Unreadable images get the placeholder size
        (1, 1): they have no pixels to crop and are never fed to a model.
        """
        if self._sizes is None:
            with ThreadPoolExecutor(self._io_threads()) as pool:
                results = list(pool.map(self._header_size, range(len(self))))
            sizes = np.ones((len(self), 2), dtype=np.int64)
            for sample, (size, error) in enumerate(results):
                if error is None:
                    sizes[sample] = size
                else:
                    self._unreadable[sample] = error
            self._sizes = sizes
        return self._sizes, dict(self._unreadable)

    def _io_threads(self) -> int:
        """Threads for per-image reads: a remote store's requests wait on latency, so as many
        as its ``--storage-option concurrency`` allows."""
        if not self.is_remote:
            return _IO_THREADS
        return max(_IO_THREADS, self.members.shards[0].options.concurrency)  # type: ignore[union-attr]

    def _header_size(self, sample: int) -> tuple[tuple[int, int], str | None]:
        if self.members is None:
            return _header_size(self.path(sample), self.name(sample))
        try:
            member = self.members.open(sample)
        except OSError as error:
            return (1, 1), f"{type(error).__name__}: {error}"
        with member:
            return _header_size(member, self.name(sample))


def _header_size(source: Path | BinaryIO, name: str) -> tuple[tuple[int, int], str | None]:
    """((height, width), None) from the image header, or ((1, 1), error); ``name``: the image's
    name in messages (PIL would name a file object by its address)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            width, height = image.size
            refused = refusal(image)
    except UnidentifiedImageError:
        return (1, 1), f"UnidentifiedImageError: cannot identify image file {name!r}"
    except (StorageError, ShardChangedError):
        raise  # the storage failed, not the image: never an unreadable (skippable) image
    except Exception as error:  # PIL raises many types for bad files
        return (1, 1), f"{type(error).__name__}: {error}"
    if width < 1 or height < 1:
        return (1, 1), f"empty image ({width}x{height})"
    if refused is not None:
        return (1, 1), refused
    return (height, width), None


def content_hashes(dataset: ImageDataset, samples: Sequence[int]) -> list[int | None]:
    """The content hash (``fastkd.hashing``) of each sample's file as it is now, None where it
    cannot be read: what the loaders record as they read (threads; I/O bound). Shards on object
    storage are read a batch at a time (``read_many``); a storage failure or a rewritten shard
    is raised, never taken for a changed file."""
    if dataset.members is not None and dataset.members.is_remote:
        hashes: list[int | None] = []
        for start in range(0, len(samples), _REMOTE_HASH_BATCH):
            batch = dataset.read_many(samples[start : start + _REMOTE_HASH_BATCH])
            hashes += [None if isinstance(b, OSError) else content_hash(b) for b in batch]
        return hashes

    def one(sample: int) -> int | None:
        try:
            return content_hash(dataset.read_bytes(sample))
        except StorageError:
            raise
        except OSError:
            return None

    with ThreadPoolExecutor(dataset._io_threads()) as pool:
        return list(pool.map(one, samples))


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
    """An image folder (``path/<class>/**/<image>``), a file list (``path`` is a text file), or
    WebDataset tar shards (a ``.tar`` path or a brace pattern: ``fastkd.data.shards``).

    A file list holds ``relative/path label`` per line (the path may contain spaces; blank lines
    and ``#`` comments are skipped), relative to ``root`` or else to the list's folder; labels are
    class indices ``0..C-1`` (``fastkd.data.labels``: plain decimals below ``MAX_CLASSES``) and
    the classes are named by their index, as in shards (``cls``): ``classes`` is empty.
    """
    if is_shard_spec(path):
        if root is not None:
            raise DatasetError(f"--root is only for file lists; {os.fspath(path)} names tar shards")
        return _open_shards(os.fspath(path))
    if is_object_url(path):
        raise DatasetError(
            f"data set {path}: on object storage fastkd reads WebDataset tar shards (a .tar URL "
            "or a brace pattern, e.g. 's3://bucket/train-{000000..000146}.tar'); image folders "
            "and file lists must be local (or mounted)"
        )
    path = Path(path)
    if path.is_dir():
        if root is not None:
            raise DatasetError(f"--root is only for file lists; {path} is an image folder")
        return _open_image_folder(path)
    if path.is_file():
        return _open_file_list(path, Path(root) if root is not None else path.parent)
    raise DatasetError(f"data set {path} does not exist (expected an image folder or a file list)")


def _open_shards(spec: str) -> ImageDataset:
    shards = expand_shards(spec)
    keys, labels, members = index_shards(shards)
    first = shards[0]
    return ImageDataset(
        root=first.parent if isinstance(first, Path) else str(first).rsplit("/", 1)[0],
        keys=keys,
        labels=labels,
        classes=[],
        num_classes=int(labels.max()) + 1,
        file_sizes=members.size,
        source=spec,
        members=members,
    )


def _open_image_folder(root: Path) -> ImageDataset:
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        tars = sorted(p.name for p in root.glob("*.tar"))
        hint = (
            f"; for its {len(tars)} tar shard(s) give a .tar or a brace pattern, e.g. "
            f"'{root / tars[0]}'"
            if tars
            else ""
        )
        raise DatasetError(
            f"image folder {root} has no class subfolders (expected root/<class>/){hint}"
        )
    keys: list[str] = []
    labels: list[int] = []
    visited: dict[str, Path] = {os.path.realpath(root): root}  # real folder -> where first seen
    for label, name in enumerate(classes):
        for folder, subfolders, files in os.walk(root / name, followlinks=True):
            _visit_once(Path(folder), visited)
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
        num_classes=len(classes),
        file_sizes=_file_sizes(paths, [str(root)] * len(paths)),
    )


def _visit_once(folder: Path, visited: dict[str, Path]) -> None:
    """Refuse a folder reached twice (a symbolic link loop, or two links to one folder): its
    images would be read again under other labels."""
    real = os.path.realpath(folder)
    if real in visited:
        raise DatasetError(
            f"image folder {folder} is {visited[real]} again (through a symbolic link): "
            "remove the link, or list the images in a file list"
        )
    visited[real] = folder


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
        key, label = Path(parts[0]).as_posix(), parse_label(parts[1], where)
        if Path(key).is_absolute() or ".." in Path(key).parts:
            raise DatasetError(f"{where}: path {key!r} must be relative to {root}, inside it")
        if key in seen:
            raise DatasetError(f"{where}: {key} is listed twice (first at {seen[key]})")
        seen[key] = where
        keys.append(key)
        labels.append(label)
        origins.append(where)
    if not keys:
        raise DatasetError(f"file list {list_file} lists no images")
    return ImageDataset(
        root=root,
        keys=keys,
        labels=np.asarray(labels, dtype=np.int64),
        classes=[],
        num_classes=max(labels) + 1,
        file_sizes=_file_sizes([root / key for key in keys], origins),
    )
