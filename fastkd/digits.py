"""The embedded real data set: scikit-learn's handwritten digits as an image folder.

The 1,797 8x8 scans ship inside scikit-learn, so tests and the demo need no download. They are
upscaled (bicubic) to RGB PNGs and split, stratified and fixed, into train / val (held out from
training data, for model selection) / test, each an ImageFolder: ``root/<split>/<digit>/<id>.png``.

It also defines the demo's pool: three architecture families from timm, small enough to train from
scratch on two CPU cores in seconds, different enough to make different mistakes (``DIGITS_POOL``).
Importing this module registers ``fastkd_mlp_mixer`` with timm (see there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from timm.models import build_model_with_cfg, register_model
from timm.models.mlp_mixer import MlpMixer

from fastkd.errors import ConfigError
from fastkd.files import atomic_write_text

# Public names; timm's ``register_model`` appends the model it registers here.
__all__ = [
    "DIGITS_POOL",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "PoolMember",
    "split_indices",
    "write_digits_folder",
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
            folder = root / split / str(labels[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            image.convert("RGB").save(folder / f"{index:04d}.png")
    atomic_write_text(marker, expected)
    return root


@register_model
def fastkd_mlp_mixer(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """timm's MLP-Mixer with every size open (``img_size``, ``patch_size``, ``num_blocks``,
    ``embed_dim``, ...): timm's registered mixers fix the patch, depth and width, so none fits a
    32 px input. No pretrained weights; the default data config follows ``img_size``.

    A checkpoint of this architecture loads in any process that imported ``fastkd.digits``
    (every ``fastkd`` command does).
    """
    if pretrained:
        raise ConfigError("fastkd_mlp_mixer has no pretrained weights: train it from scratch")
    size = int(kwargs.get("img_size", 224))
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {
        "input_size": (3, size, size),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.proj",
        "classifier": "head",
    }
    return build_model_with_cfg(MlpMixer, "fastkd_mlp_mixer", pretrained=False, **kwargs)


@dataclass(frozen=True)
class PoolMember:
    """One architecture of the demo's pool, trained from scratch with cross-entropy.

    ``model_kwargs`` go to ``timm.create_model``; they include the data config (input size and
    crop) through ``pretrained_cfg_overlay``, so checkpoints carry the 32 px preprocessing.
    ``epochs`` and ``lr`` (Adam, cosine schedule) are what the member needs to reach its accuracy.
    """

    name: str
    arch: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 1e-3

    @property
    def spec(self) -> str:
        """The ``alias:ARCH`` model spec of the untrained member (``fastkd.models``)."""
        return f"{self.name}:{self.arch}"


def _whole_image(size: int) -> dict[str, Any]:
    """Data config overlay: ``size`` px input, the whole image at eval (the digit fills it)."""
    return {"input_size": (3, size, size), "crop_pct": 1.0}


# The 32 px images carry the 8x8 scans' information: a patch of 8 px is 2x2 original pixels, so
# the token models see a 4x4 grid. Patch 4 (64 tokens) costs 4-16x more per step on a CPU and
# learns no better in the demo's budget. Epochs and lr: enough for each to level off on the val
# split (measured: val top-1 98.3 / 95.3 / 97.2%, about 85 s for all three on 2 CPU cores); the
# three still disagree on a few % of the test images, which is what they can teach each other.
DIGITS_POOL: tuple[PoolMember, ...] = (
    PoolMember(
        "resnet",
        "resnet10t",
        {
            "channels": (32, 64, 128, 256),
            "stem_width": 16,
            "pretrained_cfg_overlay": _whole_image(32),
        },
        epochs=12,
        lr=3e-3,
    ),
    PoolMember(
        "vit",
        "vit_tiny_patch16_224",
        {
            "img_size": 32,
            "patch_size": 8,
            "depth": 4,
            "embed_dim": 96,
            "num_heads": 3,
            "class_token": False,
            "global_pool": "avg",
            "pretrained_cfg_overlay": _whole_image(32),
        },
        epochs=60,
        lr=1e-3,
    ),
    PoolMember(
        "mixer",
        "fastkd_mlp_mixer",
        {"img_size": 32, "patch_size": 8, "num_blocks": 4, "embed_dim": 128},
        epochs=20,
        lr=1e-3,
    ),
)
