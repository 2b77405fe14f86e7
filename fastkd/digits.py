"""The embedded real data set: scikit-learn's handwritten digits as an image folder.

The 1,797 8x8 scans ship inside scikit-learn, so tests and the demo need no download. They are
upscaled (bicubic) to RGB PNGs and split, stratified and fixed, into train / val (held out from
training data, for model selection) / test, each an ImageFolder: ``root/<split>/<digit>/<id>.png``.
Cross-validation reads the same files through file lists (``write_fold_lists``): every image is
the test image of one fold.

It also defines the demo's pool: three architecture families from timm, small enough to train from
scratch on two CPU cores in seconds, each on its own part of the data (``DIGITS_POOL``), so that
each is right where another is wrong. Its mixer, ``fastkd_mlp_mixer``, is fastkd's own
(``fastkd.architectures``, registered with timm where models are built); this module imports no
timm.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastkd.errors import ConfigError
from fastkd.files import atomic_write_text

__all__ = [
    "DIGITS_POOL",
    "POOL_IMAGE_SIZE",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "PoolMember",
    "digits_labels",
    "fold_indices",
    "fold_list_name",
    "fold_splits",
    "sample_of",
    "split_indices",
    "write_digits_folder",
    "write_fold_lists",
    "write_sample_list",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.6, 0.2, 0.2)
SPLIT_SEED = 0
_MARKER = ".fastkd-digits"


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices: per class, a seeded shuffle cut by SPLIT_FRACTIONS."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cuts = np.round(np.cumsum(SPLIT_FRACTIONS)[:-1] * len(members)).astype(int)
        for name, chunk in zip(SPLITS, np.split(members, cuts), strict=True):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def write_digits_folder(root: str | os.PathLike, image_size: int = 32) -> Path:
    """Write the digits as ``root/{train,val,test}/<digit>/<id>.png`` and return ``root``.

    Idempotent: a finished folder (marked once complete) is reused as it is. The marker is written
    last, so a folder cut short by a crash is rebuilt rather than trusted.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / _MARKER
    expected = f"size={image_size}\n"
    if marker.is_file() and marker.read_text() == expected:
        return root
    digits = load_digits()
    images = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    for split, indices in split_indices(labels).items():
        for index in indices:
            path = root / _image_key(split, labels[index], index)
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            image.convert("RGB").save(path)
    atomic_write_text(marker, expected)
    return root


@functools.cache
def _labels() -> np.ndarray:
    from sklearn.datasets import load_digits

    labels = load_digits().target.astype(np.int64)
    labels.flags.writeable = False
    return labels


def digits_labels() -> np.ndarray:
    """The 1,797 labels, in scikit-learn's order (a sample's index is its file's id)."""
    return _labels().copy()


def _image_key(split: str, label: int, index: int) -> str:
    """Where ``write_digits_folder`` puts scikit-learn's image ``index``, relative to its root."""
    return f"{split}/{label}/{index:04d}.png"


def sample_of(key: str) -> int:
    """The scikit-learn index of a digits image, from its key (``_image_key``'s file name)."""
    return int(Path(key).stem)


@functools.cache
def _image_keys() -> tuple[str, ...]:
    """Every image's key, by scikit-learn index."""
    labels = _labels()
    keys = [""] * labels.size
    for split, indices in split_indices(labels).items():
        for index in indices:
            keys[index] = _image_key(split, labels[index], index)
    return tuple(keys)


def fold_indices(labels: np.ndarray, folds: int, seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """``folds`` stratified, disjoint, sorted index sets covering every sample once: per class,
    a seeded shuffle dealt round-robin from a class-dependent start (so fold sizes differ by at
    most one per class and the remainders spread over the folds)."""
    if folds < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    offset = 0
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        for i in range(folds):
            parts[(i + offset) % folds].append(members[i::folds])
        offset += len(members) % folds
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def fold_splits(folds: int, fold: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Cross-validation fold ``fold``'s samples (scikit-learn indices, sorted): test is that
    fold, val the next one, train the rest. Every image is a test image of exactly one fold."""
    if not 0 <= fold < folds:
        raise ConfigError(f"fold must be in 0..{folds - 1}, got {fold}")
    parts = fold_indices(_labels(), folds, seed)
    held_out = (fold, (fold + 1) % folds)
    return {
        "train": np.sort(np.concatenate([p for i, p in enumerate(parts) if i not in held_out])),
        "val": parts[held_out[1]],
        "test": parts[fold],
    }


def write_fold_lists(
    root: str | os.PathLike, folds: int, fold: int, seed: int = SPLIT_SEED
) -> dict[str, Path]:
    """File lists of ``fold_splits`` over a ``write_digits_folder`` folder
    (``write_sample_list``, named by ``fold_list_name``); returns split -> path."""
    return {
        split: write_sample_list(root, fold_list_name(folds, fold, seed, split), samples)
        for split, samples in fold_splits(folds, fold, seed).items()
    }


def fold_list_name(folds: int, fold: int, seed: int, split: str) -> str:
    """The file name of a fold's split list (``write_fold_lists``): folds of other seeds or
    counts never share a file."""
    return f"fold-{fold}-of-{folds}-seed-{seed}-{split}.txt"


def write_sample_list(root: str | os.PathLike, name: str, samples: np.ndarray) -> Path:
    """A file list ``root/name`` of the digits ``samples`` (scikit-learn indices) in a
    ``write_digits_folder`` folder, in the given order: paths relative to ``root``, labels."""
    labels, keys = _labels(), _image_keys()
    path = Path(root) / name
    atomic_write_text(path, "".join(f"{keys[i]} {labels[i]}\n" for i in samples))
    return path


@dataclass(frozen=True)
class PoolMember:
    """One architecture of the demo's pool, trained from scratch with cross-entropy.

    ``model_kwargs`` go to ``timm.create_model``; they include the data config (input size and
    crop) through ``pretrained_cfg_overlay``, so checkpoints carry the demo's preprocessing.
    ``epochs``, ``lr`` (Adam, cosine schedule) and ``batch_size`` are its recipe. ``focus``: the classes of which it
    sees every training image; of the others it sees ``rest_fraction`` (all classes when
    ``focus`` is empty). Real pools differ in data as much as in architecture: this is how the
    demo's members come to be right where another is wrong.
    """

    name: str
    arch: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    focus: tuple[int, ...] = ()
    rest_fraction: float = 1.0

    @property
    def spec(self) -> str:
        """The ``alias:ARCH`` model spec of the untrained member (``fastkd.models``)."""
        return f"{self.name}:{self.arch}"

    def pretraining_samples(self, samples: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """The member's part of ``samples`` (indices into ``labels``): every sample of its focus
        classes and a seeded ``rest_fraction`` of each other class, sorted."""
        samples = np.asarray(samples, dtype=np.int64)
        if not self.focus:
            return np.sort(samples)
        rng = np.random.default_rng([seed, *self.name.encode()])
        kept = []
        for cls in np.unique(labels[samples]):
            members = samples[labels[samples] == cls]
            if cls not in self.focus:
                members = rng.permutation(members)[: round(self.rest_fraction * len(members))]
            kept.append(members)
        return np.sort(np.concatenate(kept))


def _whole_image(size: int) -> dict[str, Any]:
    """Data config overlay: ``size`` px input, the whole image at eval (the digit fills it)."""
    return {"input_size": (3, size, size), "crop_pct": 1.0}


POOL_IMAGE_SIZE = 16  # the demo's pool reads 16 px images: the 8x8 scans upscaled twice

# Three architecture families, each trained on its own part of the training split: every image
# of six focus classes and 30% of the rest, so each class is some member's weak spot (3 and 6
# are focused by one member, the others by two), with its own epochs and lr. At 16 px a patch of 4
# px is 2x2 original pixels, so the token models see a 4x4 grid.
DIGITS_POOL: tuple[PoolMember, ...] = (
    PoolMember(
        "resnet",
        "resnet10t",
        {
            "channels": (16, 32, 64, 128),
            "stem_width": 16,
            "pretrained_cfg_overlay": _whole_image(POOL_IMAGE_SIZE),
        },
        epochs=8,
        lr=3e-3,
        focus=(0, 1, 2, 3, 4, 5),
        rest_fraction=0.3,
    ),
    PoolMember(
        "vit",
        "vit_tiny_patch16_224",
        {
            "img_size": POOL_IMAGE_SIZE,
            "patch_size": 4,
            "depth": 3,
            "embed_dim": 64,
            "num_heads": 2,
            "class_token": False,
            "global_pool": "avg",
            "pretrained_cfg_overlay": _whole_image(POOL_IMAGE_SIZE),
        },
        epochs=16,
        lr=2e-3,
        batch_size=32,
        focus=(4, 5, 6, 7, 8, 9),
        rest_fraction=0.3,
    ),
    PoolMember(
        "mixer",
        "fastkd_mlp_mixer",
        {"img_size": POOL_IMAGE_SIZE, "patch_size": 4, "num_blocks": 3, "embed_dim": 64},
        epochs=10,
        lr=2e-3,
        batch_size=32,
        focus=(0, 1, 2, 7, 8, 9),
        rest_fraction=0.3,
    ),
)
