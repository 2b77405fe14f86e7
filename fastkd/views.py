"""View replay: augmentation parameters from a counter-based RNG.

Every random number here is a pure function of ``(seed, purpose, sample index, view or epoch,
draw)``: it is computed by Philox4x64-10 (Salmon et al., SC'11; the generator behind
``numpy.random.Philox``) with the seed and purpose as the key and the indices as the counter. So
the crop of view ``v`` of sample ``i`` is the same whatever the batch size, the order, the number
of data-loader workers or the world size, and the dump and the training run replay the very same
views. The generator is vectorised over all rows at once: one numpy ``Generator`` per
(sample, view) would take minutes for ImageNet's 1.28 M samples x V views.

Crops follow torchvision's ``RandomResizedCrop.get_params`` (10 attempts, then a centre crop with
the aspect ratio clamped); flips are horizontal with probability ``hflip``. View 0 is the eval view
when ``eval_view`` is set: the centre square of side ``eval_crop_pct`` x the short side, unflipped
(timm's eval transform: resize the short side to ``size / crop_pct``, centre-crop ``size``).

``view_boxes`` gives integer pixel boxes ``(top, left, h, w)`` (what the store keeps);
``view_params`` gives them as float32 fractions ``(y0, x0, h, w)`` of the image height and width
(what the loaders take), and ``round(fraction * size)`` gives the pixels back exactly.
"""

from __future__ import annotations

import numpy as np

from fastkd.augment import AugmentConfig
from fastkd.errors import ConfigError, DatasetError

# Philox4x64-10 constants (Random123, as in numpy's Philox).
_PHILOX_M = (np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157))
_PHILOX_W = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B))
_PHILOX_ROUNDS = 10
_LOW32 = np.uint64(0xFFFFFFFF)
_U64_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53: the top 53 bits as a double in [0, 1)

# Second key word: one independent stream per purpose, so crops, epoch views and sample order
# never share random numbers even for equal counters.
_STREAM_VIEW = 0x76696577  # "view"
_STREAM_EPOCH_VIEW = 0x65766965  # "evie"
_STREAM_ORDER = 0x6F726472  # "ordr"
_STREAM_TAIL = 0x7461696C  # "tail"

_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop
_NEVER_FITS = float(2**62)  # a crop side larger than any image (and than int64 can't hold)


def _mulhilo64(a: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """High and low 64-bit words of the 128-bit products ``a * m`` (uint64 arrays)."""
    m_lo, m_hi = m & _LOW32, m >> np.uint64(32)
    a_lo, a_hi = a & _LOW32, a >> np.uint64(32)
    lo_lo = a_lo * m_lo
    lo_hi = a_lo * m_hi
    hi_lo = a_hi * m_lo
    carry = (lo_lo >> np.uint64(32)) + (lo_hi & _LOW32) + (hi_lo & _LOW32)
    high = (
        a_hi * m_hi + (lo_hi >> np.uint64(32)) + (hi_lo >> np.uint64(32)) + (carry >> np.uint64(32))
    )
    return high, a * m


def philox4x64(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x64-10 block function: counters uint64 [..., 4] -> random words uint64 [..., 4].

    ``numpy.random.Philox(key=k0 + (k1 << 64), counter=c)`` outputs ``philox4x64(c + 1, (k0, k1))``
    (it increments its counter before each block).
    """
    counter = np.asarray(counter, dtype=np.uint64)
    c0, c1, c2, c3 = (counter[..., i].copy() for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    with np.errstate(over="ignore"):
        for round_ in range(_PHILOX_ROUNDS):
            if round_:
                k0, k1 = k0 + _PHILOX_W[0], k1 + _PHILOX_W[1]
            hi0, lo0 = _mulhilo64(c0, _PHILOX_M[0])
            hi1, lo1 = _mulhilo64(c2, _PHILOX_M[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1)


def _uniforms(
    seed: int, stream: int, rows: np.ndarray, column: np.ndarray | int, draw: int
) -> np.ndarray:
    """Four float64 uniforms in [0, 1) per row: [n, 4], from the counter (row, column, draw, 0)."""
    if not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be in [0, 2**64), got {seed}")
    rows = np.asarray(rows, dtype=np.uint64)
    counter = np.zeros((rows.shape[0], 4), dtype=np.uint64)
    counter[:, 0] = rows
    counter[:, 1] = column
    counter[:, 2] = draw
    words = philox4x64(counter, (seed, stream))
    return (words >> np.uint64(11)).astype(np.float64) * _U64_TO_UNIT


def _check_indices(indices: np.ndarray, name: str = "indices") -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ConfigError(
            f"{name} must be a 1-D integer array, got {indices.dtype} {indices.shape}"
        )
    if indices.size and indices.min() < 0:
        raise ConfigError(f"{name} must be non-negative, got {indices.min()}")
    return indices.astype(np.int64)


def _random_resized_crops(
    seed: int,
    samples: np.ndarray,
    views: np.ndarray,
    height: np.ndarray,
    width: np.ndarray,
    cfg: AugmentConfig,
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: int64 [n, 4] = (top, left, h, w)."""
    n = samples.shape[0]
    boxes = np.zeros((n, 4), dtype=np.int64)
    area = (height * width).astype(np.float64)
    log_ratio = np.log(np.asarray(cfg.ratio, dtype=np.float64))
    todo = np.arange(n)
    for attempt in range(_CROP_ATTEMPTS):
        if todo.size == 0:
            break
        u = _uniforms(seed, _STREAM_VIEW, samples[todo], views[todo], attempt)
        target_area = area[todo] * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 0])
        aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 1])
        # an extreme ratio makes a side overflow: clipped far above any image, so it never fits
        w = np.round(np.minimum(np.sqrt(target_area * aspect), _NEVER_FITS)).astype(np.int64)
        h = np.round(np.minimum(np.sqrt(target_area / aspect), _NEVER_FITS)).astype(np.int64)
        fits = (w > 0) & (w <= width[todo]) & (h > 0) & (h <= height[todo])
        rows = todo[fits]
        h, w, u = h[fits], w[fits], u[fits]
        top = np.floor(u[:, 2] * (height[rows] - h + 1)).astype(np.int64)
        left = np.floor(u[:, 3] * (width[rows] - w + 1)).astype(np.int64)
        boxes[rows] = np.stack([top, left, h, w], axis=1)
        todo = todo[~fits]
    if todo.size:  # torchvision's fallback: centre crop, aspect ratio clamped into cfg.ratio
        h, w = height[todo].copy(), width[todo].copy()
        in_ratio = w / h
        narrow, wide = in_ratio < min(cfg.ratio), in_ratio > max(cfg.ratio)
        h[narrow] = np.round(w[narrow] / min(cfg.ratio)).astype(np.int64)
        w[wide] = np.round(h[wide] * max(cfg.ratio)).astype(np.int64)
        # an extreme ratio rounds a side to 0 px, where torchvision would fail: keep one pixel
        np.maximum(h, 1, out=h)
        np.maximum(w, 1, out=w)
        boxes[todo] = np.stack([(height[todo] - h) // 2, (width[todo] - w) // 2, h, w], axis=1)
    return boxes


def _eval_crops(height: np.ndarray, width: np.ndarray, crop_pct: float) -> np.ndarray:
    """Centre square of side round(crop_pct * short side): int64 [n, 4] = (top, left, h, w)."""
    side = np.maximum(np.round(crop_pct * np.minimum(height, width)).astype(np.int64), 1)
    return np.stack([(height - side) // 2, (width - side) // 2, side, side], axis=1)


def view_boxes(
    seed: int, indices: np.ndarray, num_views: int, sizes: np.ndarray, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel crop boxes and flips of every view of the given samples.

    indices: int [n] sample indices in the data set (the counter, so any subset or order gives
        the same rows as the full computation). sizes: int [n, 2] image (height, width).
    Returns boxes int64 [n, V, 4] = (top, left, height, width) in pixels, flips bool [n, V].
    """
    indices = _check_indices(indices)
    sizes = np.asarray(sizes)
    n = indices.shape[0]
    if sizes.shape != (n, 2):
        raise ConfigError(
            f"sizes must be [n, 2] = (height, width) for {n} samples, got {sizes.shape}"
        )
    if n and sizes.min() < 1:
        bad = int(indices[np.flatnonzero((sizes < 1).any(axis=1))[0]])
        raise DatasetError(f"sample {bad} has an empty image size (height, width must be >= 1)")
    if num_views < 1:
        raise ConfigError(f"num_views must be >= 1, got {num_views}")

    samples = np.repeat(indices, num_views)
    views = np.tile(np.arange(num_views, dtype=np.int64), n)
    height = np.repeat(sizes[:, 0].astype(np.int64), num_views)
    width = np.repeat(sizes[:, 1].astype(np.int64), num_views)

    boxes = _random_resized_crops(seed, samples, views, height, width, cfg)
    # One more draw past the crop attempts decides the flip.
    flips = _uniforms(seed, _STREAM_VIEW, samples, views, _CROP_ATTEMPTS)[:, 0] < cfg.hflip
    if cfg.eval_view:
        first = views == 0
        boxes[first] = _eval_crops(height[first], width[first], cfg.eval_crop_pct)
        flips[first] = False
    return boxes.reshape(n, num_views, 4), flips.reshape(n, num_views)


def box_fractions(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Pixel boxes [n, ..., 4] (top, left, h, w) of images sized [n, 2] (height, width) ->
    float32 fractions (y0, x0, h, w) of the height and width."""
    sizes = np.asarray(sizes, dtype=np.float64)
    scale = np.concatenate([sizes, sizes], axis=-1).reshape(
        sizes.shape[0], *[1] * (boxes.ndim - 2), 4
    )
    return (boxes / scale).astype(np.float32)


def view_params(
    seed: int, indices: np.ndarray, num_views: int, sizes: np.ndarray, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Crop boxes and flips of every view of the given samples (``view_boxes`` as fractions).

    Returns boxes float32 [n, V, 4] = (y0, x0, h, w) as fractions of height/width, flips bool [n, V].
    """
    boxes, flips = view_boxes(seed, indices, num_views, sizes, cfg)
    return box_fractions(boxes, sizes), flips


def all_views(
    seed: int, indices: np.ndarray, num_views: int, sizes: np.ndarray, cfg: AugmentConfig
) -> dict[str, np.ndarray]:
    """Every view of the given samples as flat rows, sample-major: the ``samples``, ``views``,
    ``boxes`` [n V, 4] (fractions) and ``flips`` arguments of ``fastkd.data.view_loader``."""
    indices = _check_indices(indices)
    boxes, flips = view_params(seed, indices, num_views, sizes, cfg)
    return {
        "samples": np.repeat(indices, num_views),
        "views": np.tile(np.arange(num_views, dtype=np.int64), indices.shape[0]),
        "boxes": boxes.reshape(-1, 4),
        "flips": flips.reshape(-1),
    }


def pixel_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer (top, left, h, w) of a fractional box on an image of the given size."""
    y0, x0, h, w = (float(v) for v in box)
    return round(y0 * height), round(x0 * width), round(h * height), round(w * width)


def epoch_views(seed: int, epoch: int, indices: np.ndarray, num_views: int) -> np.ndarray:
    """Which stored view each sample uses in ``epoch``: int64 [n] in [0, num_views).

    Every ``num_views`` consecutive epochs (0..V-1, V..2V-1, ...) visit each view of a sample
    exactly once, in an order drawn per sample and cycle, so targets never repeat before all
    views have been seen (Beyer et al.: fixed per-image targets overfit).
    """
    indices = _check_indices(indices)
    if num_views < 1:
        raise ConfigError(f"num_views must be >= 1, got {num_views}")
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    cycle, position = divmod(epoch, num_views)
    keys = np.concatenate(
        [
            _uniforms(seed, _STREAM_EPOCH_VIEW, indices, cycle, draw)
            for draw in range(-(-num_views // 4))
        ],
        axis=1,
    )[:, :num_views]
    order = np.argsort(keys, axis=1, kind="stable")
    return order[:, position]


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The epoch's sample order: a permutation of ``range(num_samples)`` (int64)."""
    if num_samples < 0 or epoch < 0:
        raise ConfigError(f"need num_samples >= 0 and epoch >= 0, got {num_samples}, {epoch}")
    keys = _uniforms(seed, _STREAM_ORDER, np.arange(num_samples), epoch, 0)[:, 0]
    return np.argsort(keys, kind="stable")


def tail_uniforms(seed: int, samples: np.ndarray, views: np.ndarray, model: int) -> np.ndarray:
    """One uniform in [0, 1) per (sample, view) row for model ``model``'s sampled tail: word 0
    of counter ``(sample, view, model, 0)`` in the tail stream (float64, [n])."""
    samples, views = np.asarray(samples), np.asarray(views)
    if samples.shape != views.shape or samples.ndim != 1:
        raise ConfigError(f"samples {samples.shape} and views {views.shape} must be equal 1-d")
    return _uniforms(seed, _STREAM_TAIL, samples, views.astype(np.uint64), model)[:, 0]
