"""Photo-like JPEGs for the benchmarks: views of two real photographs, at ImageNet's sizes.

Decoding cost depends on the content: a smooth synthetic field decodes far faster than a
photograph of the same size, because its entropy-coded data is a fraction as large. The only
photographs a package ships here are scikit-learn's two samples (``load_sample_images``: a
temple and a flower, 427 x 640), and they are smoother than ImageNet's average photo (at
quality 90 they take 0.18 and 0.36 bytes a pixel; ImageNet's files about 0.8). So each image
is a 2 x 2 mosaic of random crops of them, each crop downscaled (up to 2x) into its tile as
ImageNet's photos were downscaled from larger ones, at a shape drawn from ImageNet's common ones
(500 x 375, 375 x 500, 500 x 333, ...), each tile flipped at random, the whole given a random
brightness, contrast, saturation and hue and a luminance grain (sigma 6-10 levels, a camera's
noise), then written as a quality-90 baseline JPEG with 4:2:0 chroma, as ImageNet's files
mostly are, at file sizes near ImageNet's (docs/throughput.md). ``describe`` reports what
was made, so a benchmark's result says what it decoded. ``label_list`` gives them ImageNet's
1000 classes.

Every benchmark that needs photographs calls ``write_photos``: one home for the workload.
"""

from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

IMAGENET_SHAPES = (
    (375, 500),
    (500, 375),
    (333, 500),
    (500, 333),
    (400, 500),
    (500, 400),
    (500, 500),
)
QUALITY = 90  # JPEG quality of the written files


@functools.cache
def _sources() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(image) for image in load_sample_images().images)


def photo(rng: np.random.Generator) -> Image.Image:
    """One random photo-like RGB image at an ImageNet shape (see the module docstring)."""
    height, width = IMAGENET_SHAPES[int(rng.integers(len(IMAGENET_SHAPES)))]
    image = Image.new("RGB", (width, height))
    rows, cols = np.linspace(0, height, 3).astype(int), np.linspace(0, width, 3).astype(int)
    for top, bottom in itertools.pairwise(rows):
        for left, right in itertools.pairwise(cols):
            image.paste(_tile(rng, bottom - top, right - left), (int(left), int(top)))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.integers(-12, 13))) % 256
    pixels = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32)
    grain = rng.normal(0.0, rng.uniform(6.0, 10.0), (height, width, 1))  # luminance only
    return Image.fromarray(np.clip(np.rint(pixels + grain), 0, 255).astype(np.uint8), "RGB")


def _tile(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A random crop of a source photo, 1-2x the tile's size, resized into the tile."""
    sources = _sources()
    source = sources[int(rng.integers(len(sources)))]
    scale = rng.uniform(1.0, 2.0)
    crop_w = int(min(source.width, round(width * scale)))
    crop_h = int(min(source.height, round(height * scale)))
    left = int(rng.integers(source.width - crop_w + 1))
    top = int(rng.integers(source.height - crop_h + 1))
    tile = source.crop((left, top, left + crop_w, top + crop_h))
    tile = tile.resize((int(width), int(height)), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return tile


def write_photos(root: Path, count: int, *, classes: int = 10, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs in ``root/class<k>/<index>.jpg`` (an image folder of
    ``classes`` classes, images dealt round-robin): the same files for the same seed, written
    by a thread per core (PIL encodes and resamples without the GIL)."""

    def write(index: int) -> None:
        rng = np.random.default_rng([seed, index])
        image = photo(rng)
        folder = root / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.jpg", quality=QUALITY, subsampling="4:2:0")

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(count)))
    return root


def label_list(root: Path, classes: int) -> Path:
    """A file list (``relative/path label`` per line, ``root/labels.txt``) of the photos under
    ``root`` with labels dealt round-robin over ``classes``, the last image given the last class:
    a data set of ``classes`` classes (ImageNet's 1000 by default in the benchmarks), so the
    pool's heads, the store's top-k and tail and the loss run at the size users run."""
    files = sorted(root.rglob("*.jpg"), key=lambda f: f.name)
    labels = [index % classes for index in range(len(files))]
    if files:
        labels[-1] = classes - 1
    lines = [f"{f.relative_to(root)} {label}\n" for f, label in zip(files, labels, strict=True)]
    listing = root / "labels.txt"
    listing.write_text("".join(lines))
    return listing


def describe(root: Path) -> dict[str, float | int | str]:
    """What a folder of written photos holds: count, mean side and file size (for results)."""
    files = sorted(root.rglob("*.jpg"))
    sizes = [f.stat().st_size for f in files]
    shapes = []
    for path in files:
        with Image.open(path) as image:
            shapes.append(image.size)
    sides = np.asarray(shapes, dtype=np.float64)
    return {
        "source": "2 x 2 mosaics of random crops of the 2 photographs of "
        "sklearn.datasets.load_sample_images",
        "images": len(files),
        "mean_width": round(float(sides[:, 0].mean()), 1) if files else 0,
        "mean_height": round(float(sides[:, 1].mean()), 1) if files else 0,
        "mean_kb": round(float(np.mean(sizes)) / 1e3, 1) if files else 0,
        "min_kb": round(min(sizes) / 1e3, 1) if files else 0,
        "max_kb": round(max(sizes) / 1e3, 1) if files else 0,
        "jpeg_quality": QUALITY,
    }
