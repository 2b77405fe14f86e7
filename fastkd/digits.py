"""The embedded real data set: scikit-learn's handwritten digits as an image folder.

The 1,797 8x8 scans ship inside scikit-learn, so tests and the demo need no download. They are
upscaled (bicubic) to RGB PNGs and split, stratified and fixed, into train / val (held out from
training data, for model selection) / test, each an ImageFolder: ``root/<split>/<digit>/<id>.png``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

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
    with tempfile.NamedTemporaryFile("w", dir=root, delete=False) as tmp:
        tmp.write(expected)
    os.replace(tmp.name, marker)
    return root
