"""The paired, stratified bootstrap against closed forms on toy cases."""

from __future__ import annotations

import numpy as np
import pytest

from fastkd.errors import ConfigError
from fastkd.statistics import Interval, bootstrap_means, paired_bootstrap

RESAMPLES = 20_000


def test_one_row_matches_the_standard_error_of_a_mean():
    """(a) The bootstrap estimates the plug-in standard error sqrt(var_pop / n); its percentile
    interval approaches mean +/- 1.96 of it."""
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.5, 0.3], size=400)
    se = np.sqrt(d.var(ddof=0) / d.size)
    means = bootstrap_means([d], resamples=RESAMPLES, seed=3)
    assert means.shape == (RESAMPLES,)
    assert means.std() == pytest.approx(se, rel=0.03)
    assert means.mean() == pytest.approx(d.mean(), abs=0.03 * se)
    interval = paired_bootstrap([d], resamples=RESAMPLES, seed=3, scale=1.0)
    assert interval.estimate == pytest.approx(d.mean())
    assert interval.low == pytest.approx(d.mean() - 1.96 * se, abs=0.06 * se)
    assert interval.high == pytest.approx(d.mean() + 1.96 * se, abs=0.06 * se)
    assert (interval.n, interval.resamples, interval.level) == (400, RESAMPLES, 0.95)


def test_default_scale_is_points():
    d = np.array([1.0, 0.0, 0.0, -1.0, 1.0])
    points = paired_bootstrap([d], resamples=500, seed=2)
    units = paired_bootstrap([d], resamples=500, seed=2, scale=1.0)
    assert points.estimate == pytest.approx(20.0)
    assert (points.low, points.high) == pytest.approx((100 * units.low, 100 * units.high))


def test_strata_of_different_sizes_keep_their_weights():
    """(b) Var = sum_f (n_f / N)^2 var_pop_f / n_f: images are drawn within each stratum."""
    rng = np.random.default_rng(2)
    strata = [
        rng.normal(mu, sd, size=n) for mu, sd, n in ((0.0, 1.0, 300), (1.0, 3.0, 100), (-2, 2, 37))
    ]
    total = sum(s.size for s in strata)
    variance = sum((s.size / total) ** 2 * s.var(ddof=0) / s.size for s in strata)
    means = bootstrap_means(strata, resamples=RESAMPLES, seed=4)
    assert means.var() == pytest.approx(variance, rel=0.05)
    interval = paired_bootstrap(strata, resamples=RESAMPLES, seed=4, scale=1.0)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * np.sqrt(variance), rel=0.05)
    assert interval.estimate == pytest.approx(np.concatenate(strata).mean())
    assert interval.n == total


def test_rows_of_a_stratum_share_their_images():
    """(c) Two identical rows give one row's interval; anti-correlated rows a zero width one
    (resampling rows independently would give neither)."""
    rng = np.random.default_rng(5)
    row = rng.choice([-1.0, 0.0, 1.0], size=300)
    one = paired_bootstrap([row], resamples=2000, seed=7)
    twice = paired_bootstrap([np.stack([row, row])], resamples=2000, seed=7)
    assert (twice.estimate, twice.low, twice.high) == pytest.approx(
        (one.estimate, one.low, one.high)
    )
    assert twice.n == one.n == 300  # images, not cells
    opposite = paired_bootstrap([np.stack([row, -row])], resamples=2000, seed=7)
    assert (opposite.low, opposite.estimate, opposite.high) == pytest.approx((0.0, 0.0, 0.0))


def test_seeds_are_resampled_with_the_images():
    """(f) Additive seed and image effects, d[s, i] = a_s + e_i: the two-level bootstrap's
    variance is var_pop(a) / S + var_pop(e) / n (independent draws of seeds and images); one
    seed, or seeds that agree, give the image-only bootstrap's."""
    rng = np.random.default_rng(8)
    a, e = rng.normal(0.0, 2.0, size=6), rng.normal(0.0, 1.0, size=500)
    d = (a[:, None] + e[None, :])[None]  # [rows 1, seeds 6, images 500]
    variance = a.var(ddof=0) / a.size + e.var(ddof=0) / e.size
    means = bootstrap_means([d], resamples=RESAMPLES, seed=9)
    assert means.var() == pytest.approx(variance, rel=0.06)
    interval = paired_bootstrap([d], resamples=RESAMPLES, seed=9, scale=1.0)
    assert (interval.n, interval.seeds) == (500, 6)
    assert interval.estimate == pytest.approx(d.mean())
    images_only = paired_bootstrap([d.reshape(6, 500)], resamples=RESAMPLES, seed=9, scale=1.0)
    assert interval.high - interval.low > 2 * (images_only.high - images_only.low)
    agree = np.broadcast_to(e, (1, 4, 500))  # four seeds, one outcome
    assert bootstrap_means([agree], resamples=RESAMPLES, seed=9).var() == pytest.approx(
        e.var(ddof=0) / e.size, rel=0.05
    )
    one = paired_bootstrap([d[:, :1]], resamples=500, seed=3)
    assert one == paired_bootstrap([d[0, :1]], resamples=500, seed=3)  # [1, 1, n] is [1, n]
    with pytest.raises(ConfigError, match="same number of seeds"):
        paired_bootstrap([d, d[:, :2]])


def test_each_fold_draws_its_own_seeds():
    """Seeds are runs of one fold: resampled within each fold, independently, so two folds
    whose seed effects are opposite do not cancel (a draw shared across folds would give zero
    seed variance here): var = sum_f (1/F)^2 var_pop(a_f) / S."""
    a = np.array([-1.0, 0.0, 2.0, 3.0])
    folds = [np.broadcast_to(a[:, None], (1, 4, 50)), np.broadcast_to(-a[:, None], (1, 4, 50))]
    means = bootstrap_means(folds, resamples=RESAMPLES, seed=10)
    assert means.var() == pytest.approx(2 * 0.25 * a.var(ddof=0) / a.size, rel=0.05)


def test_deterministic_given_the_seed():
    """(d)"""
    rng = np.random.default_rng(6)
    strata = [rng.integers(-1, 2, size=(3, 50)), rng.integers(-1, 2, size=(3, 40))]
    assert paired_bootstrap(strata, seed=1) == paired_bootstrap(strata, seed=1)
    assert paired_bootstrap(strata, seed=1) != paired_bootstrap(strata, seed=2)


def test_a_constant_difference_gives_a_zero_width_interval():
    """(e)"""
    constant = paired_bootstrap(
        [np.full((2, 50), 0.25), np.full(7, 0.25)], resamples=100, scale=1.0
    )
    assert (constant.low, constant.estimate, constant.high) == pytest.approx((0.25,) * 3)
    assert constant.verdict() == "better"


def test_verdict_says_only_what_the_interval_supports():
    assert Interval(1.0, 0.5, 2.0, 0.95, 1, 1).verdict() == "better"
    assert Interval(-1.0, -2.0, -0.5, 0.95, 1, 1).verdict() == "worse"
    assert Interval(0.1, -0.2, 0.4, 0.95, 1, 1).verdict() == "no difference detected"
    assert Interval(0.0, 0.0, 0.0, 0.95, 1, 1).verdict() == "no difference detected"
    assert set(Interval(0.0, 0.0, 0.0, 0.95, 1, 1).to_dict()) == {
        "estimate", "low", "high", "level", "resamples", "n", "seeds"
    }  # fmt: skip


def test_bad_input_is_refused():
    for bad in ([], [np.array([])], [np.zeros((2, 2, 2, 2))]):
        with pytest.raises(ConfigError):
            paired_bootstrap(bad)
    with pytest.raises(ConfigError):
        paired_bootstrap([np.zeros(3)], level=1.0)
    with pytest.raises(ConfigError):
        paired_bootstrap([np.zeros(3)], resamples=0)
