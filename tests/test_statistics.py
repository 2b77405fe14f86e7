"""The paired bootstrap against closed forms on toy cases."""

from __future__ import annotations

import numpy as np
import pytest

from fastkd.errors import ConfigError
from fastkd.statistics import Interval, paired_bootstrap

RESAMPLES = 20_000


def test_one_stratum_matches_the_standard_error_of_a_mean():
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.5, 0.3], size=400)
    interval = paired_bootstrap([d], resamples=RESAMPLES, seed=3)
    se = np.sqrt(d.var(ddof=0) / d.size)  # the plug-in standard error the bootstrap estimates
    assert interval.estimate == pytest.approx(d.mean())
    assert interval.low == pytest.approx(d.mean() - 1.96 * se, abs=0.06 * se + 1e-12)
    assert interval.high == pytest.approx(d.mean() + 1.96 * se, abs=0.06 * se + 1e-12)
    assert interval.images == 400 and interval.resamples == RESAMPLES


def test_strata_keep_their_weights():
    rng = np.random.default_rng(2)
    strata = [rng.normal(mu, sd, size=n) for mu, sd, n in ((0.0, 1.0, 300), (1.0, 3.0, 100))]
    interval = paired_bootstrap(strata, resamples=RESAMPLES, seed=4)
    total = sum(s.size for s in strata)
    variance = sum((s.size / total) ** 2 * s.var(ddof=0) / s.size for s in strata)
    width = interval.high - interval.low
    assert width == pytest.approx(2 * 1.96 * np.sqrt(variance), rel=0.05)
    assert interval.estimate == pytest.approx(np.concatenate(strata).mean())


def test_rows_share_their_images():
    rng = np.random.default_rng(5)
    row = rng.choice([-1.0, 0.0, 1.0], size=300)
    one = paired_bootstrap([row], resamples=2000, seed=7)
    twice = paired_bootstrap([np.stack([row, row])], resamples=2000, seed=7)
    assert (one.low, one.high) == pytest.approx((twice.low, twice.high))
    opposite = paired_bootstrap([np.stack([row, -row])], resamples=2000, seed=7)
    assert opposite.low == pytest.approx(0.0) and opposite.high == pytest.approx(0.0)


def test_deterministic_constant_and_verdicts():
    rng = np.random.default_rng(6)
    d = rng.choice([0.0, 1.0], size=200)
    assert paired_bootstrap([d], seed=1) == paired_bootstrap([d], seed=1)
    constant = paired_bootstrap([np.full(50, 0.25)], resamples=100)
    assert (constant.low, constant.estimate, constant.high) == pytest.approx((0.25,) * 3)
    assert constant.verdict() == "better"
    assert Interval(-1.0, -2.0, -0.5, 0.95, 1, 1).verdict() == "worse"
    assert Interval(0.1, -0.2, 0.4, 0.95, 1, 1).verdict() == "no difference detected"
    with pytest.raises(ConfigError):
        paired_bootstrap([])
