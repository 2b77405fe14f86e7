"""View replay: Philox against numpy's, torchvision's crop rule, determinism, epochs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastkd.augment import AugmentConfig
from fastkd.views import (
    _STREAM_VIEW,
    epoch_order,
    epoch_views,
    philox4x64,
    pixel_box,
    view_params,
)

MASK64 = (1 << 64) - 1


def numpy_uniforms(seed: int, stream: int, sample: int, view: int, draw: int) -> np.ndarray:
    """Four uniforms of (sample, view, draw) from numpy's own Philox (no fastkd code)."""
    counter = sample + (view << 64) + (draw << 128)
    # numpy increments its 256-bit counter before each block, so start one below.
    bits = np.random.Philox(key=seed + (stream << 64), counter=(counter - 1) % (1 << 256))
    return (bits.random_raw(4) >> np.uint64(11)) * 2.0**-53


def torchvision_crop(height: int, width: int, u: list[np.ndarray], cfg: AugmentConfig):
    """torchvision's RandomResizedCrop.get_params, line by line, drawing from ``u[attempt]``."""
    area = height * width
    log_ratio = (math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    for draws in u:
        target_area = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * draws[0])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = math.floor(draws[2] * (height - h + 1))
            j = math.floor(draws[3] * (width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(cfg.ratio):
        w, h = width, round(width / min(cfg.ratio))
    elif in_ratio > max(cfg.ratio):
        h, w = height, round(height * max(cfg.ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    ("key", "counter"),
    [(5, 0), (2**128 - 1, 2**200 + 17), (12345 + (7 << 64), 2**64 - 1), (1, 2**256 - 3)],
)
def test_philox_matches_numpy(key: int, counter: int) -> None:
    reference = np.random.Philox(key=key, counter=counter).random_raw(12)
    counters = np.array(
        [[((counter + b) % (1 << 256)) >> (64 * w) & MASK64 for w in range(4)] for b in (1, 2, 3)],
        dtype=np.uint64,
    )
    ours = philox4x64(counters, (key & MASK64, key >> 64))
    np.testing.assert_array_equal(ours.reshape(-1), reference)


def test_crops_and_flips_follow_torchvision_with_numpy_philox() -> None:
    cfg = AugmentConfig(eval_view=False)
    seed, indices = 77, np.array([3, 10, 4096, 99991])
    sizes = np.array([[375, 500], [64, 48], [1000, 12], [333, 333]])
    boxes, flips = view_params(seed, indices, 3, sizes, cfg)
    for row, (sample, (height, width)) in enumerate(zip(indices, sizes, strict=True)):
        for view in range(3):
            u = [numpy_uniforms(seed, _STREAM_VIEW, int(sample), view, d) for d in range(11)]
            expected = torchvision_crop(int(height), int(width), u[:10], cfg)
            assert pixel_box(boxes[row, view], height, width) == expected
            assert flips[row, view] == (u[10][0] < cfg.hflip)


def test_fallback_is_the_clamped_centre_crop() -> None:
    # A 10 x 1000 image cannot hold any crop with aspect <= 4/3 and scale >= 0.9: every attempt
    # fails, so torchvision clamps: h = 10, w = round(10 * 4/3) = 13, centred at (1000 - 13) // 2.
    cfg = AugmentConfig(scale=(0.9, 1.0), eval_view=False)
    boxes, _ = view_params(0, np.arange(4), 2, np.tile([10, 1000], (4, 1)), cfg)
    for box in boxes.reshape(-1, 4):
        assert pixel_box(box, 10, 1000) == (0, 493, 10, 13)


def test_same_views_whatever_the_subset_or_order() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(20, 900, size=(500, 2))
    full_boxes, full_flips = view_params(3, np.arange(500), 6, sizes, AugmentConfig())
    subset = rng.permutation(500)[:123]
    boxes, flips = view_params(3, subset, 6, sizes[subset], AugmentConfig())
    np.testing.assert_array_equal(boxes, full_boxes[subset])
    np.testing.assert_array_equal(flips, full_flips[subset])
    other_seed, _ = view_params(4, np.arange(500), 6, sizes, AugmentConfig())
    assert not np.array_equal(other_seed, full_boxes)


def test_boxes_inside_image_within_scale_and_ratio() -> None:
    cfg = AugmentConfig(scale=(0.25, 0.8), ratio=(0.5, 2.0), hflip=0.3, eval_view=False)
    rng = np.random.default_rng(1)
    # Aspect ratios inside cfg.ratio, so an attempt succeeds well within the 10 tries (the
    # fallback, which may leave the scale range, has its own test).
    heights = rng.integers(64, 700, size=2000)
    sizes = np.stack([heights, np.round(heights * rng.uniform(0.75, 1.33, 2000))], axis=1)
    boxes, flips = view_params(9, np.arange(2000), 4, sizes, cfg)
    h_img = np.repeat(sizes[:, 0], 4).astype(np.float64)
    w_img = np.repeat(sizes[:, 1], 4).astype(np.float64)
    top, left, h, w = (
        np.round(boxes.reshape(-1, 4)[:, i] * s) for i, s in enumerate([h_img, w_img] * 2)
    )
    np.testing.assert_allclose(boxes.reshape(-1, 4)[:, 2] * h_img, h, atol=1e-3)  # whole pixels
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= h_img).all() and (left + w <= w_img).all()
    # Rounding w and h to pixels moves area and ratio by at most half a pixel per side.
    area = h_img * w_img
    assert ((h + 0.5) * (w + 0.5) >= cfg.scale[0] * area).all()
    assert ((h - 0.5) * (w - 0.5) <= cfg.scale[1] * area).all()
    assert ((w + 0.5) / (h - 0.5) >= cfg.ratio[0]).all()
    assert ((w - 0.5) / (h + 0.5) <= cfg.ratio[1]).all()
    # 8000 Bernoulli(0.3) draws: the rate is within 5 standard deviations (0.026).
    assert abs(flips.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / flips.size)


def test_eval_view_is_the_centre_crop() -> None:
    # 200 x 300 at crop_pct 0.875: side round(175) = 175, top (200-175)//2 = 12, left 62.
    boxes, flips = view_params(
        0, np.array([0, 1]), 3, np.array([[200, 300], [200, 300]]), AugmentConfig()
    )
    np.testing.assert_array_equal(
        boxes[:, 0], np.float32([[12 / 200, 62 / 300, 175 / 200, 175 / 300]] * 2)
    )
    assert not flips[:, 0].any()
    assert pixel_box(boxes[0, 0], 200, 300) == (12, 62, 175, 175)
    always = view_params(0, np.arange(50), 3, np.full((50, 2), 100), AugmentConfig(hflip=1.0))[1]
    assert not always[:, 0].any() and always[:, 1:].all()


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"sizes must be \[n, 2\]"):
        view_params(0, np.arange(3), 2, np.ones((2, 2), dtype=int), AugmentConfig())
    with pytest.raises(ValueError, match="sample 7 has an empty image size"):
        view_params(0, np.array([5, 7]), 2, np.array([[4, 4], [0, 9]]), AugmentConfig())


def test_epoch_views_visit_every_view_once_per_cycle() -> None:
    indices = np.arange(300)
    views = np.stack([epoch_views(5, e, indices, 4) for e in range(8)])  # two cycles of 4 epochs
    for cycle in (views[:4], views[4:]):
        np.testing.assert_array_equal(
            np.sort(cycle, axis=0), np.tile(np.arange(4)[:, None], (1, 300))
        )
    assert not np.array_equal(views[:4], views[4:])  # a fresh order each cycle
    subset = np.array([299, 3, 150])
    np.testing.assert_array_equal(epoch_views(5, 6, subset, 4), views[6, subset])


def test_epoch_order_is_a_counter_based_permutation() -> None:
    first = epoch_order(1, 0, 1000)
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    np.testing.assert_array_equal(first, epoch_order(1, 0, 1000))
    assert not np.array_equal(first, epoch_order(1, 1, 1000))
    assert not np.array_equal(first, epoch_order(2, 0, 1000))
