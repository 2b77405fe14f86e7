"""Intervals for paired comparisons on shared test images: a stratified, paired bootstrap.

Two sets of predictions on the same images (an arm and its control, or a model after and before)
give per image a difference of correctness, 1, 0 or -1. What would vary from one test set to
another is which images were drawn, so the images are what is resampled: within each stratum (a
cross-validation fold: every image is in exactly one fold's test set, so each fold keeps its
size), and every row of a stratum (members, seeds: the units that were tested on those images)
takes the same resampled images, which keeps their pairing. The statistic is the mean over all
(row, image) cells, in points (x 100) by default; the interval is the bootstrap's percentile
interval. docs/metrics.md explains the choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fastkd.errors import ConfigError

POINTS = 100.0  # differences of correctness (1, 0, -1) x 100: percentage points
_DRAWS_PER_BLOCK = 1 << 22  # image indices drawn at once (32 MiB of int64)


@dataclass(frozen=True)
class Interval:
    """A mean difference and its bootstrap percentile interval (points by default)."""

    estimate: float  # the mean over every (row, image) cell of the data itself
    low: float
    high: float
    level: float  # e.g. 0.95
    resamples: int
    n: int  # images (all strata), the unit that was resampled

    def verdict(self) -> str:
        """What the interval supports, and nothing more: "better" when it lies above 0,
        "worse" below 0, else "no difference detected" (which does not mean "equal")."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference detected"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strata(differences: Sequence[np.ndarray]) -> list[np.ndarray]:
    strata = [np.asarray(d, dtype=np.float64) for d in differences]
    if not strata or any(d.ndim not in (1, 2) or d.size == 0 for d in strata):
        raise ConfigError(
            "paired_bootstrap needs at least one stratum, each a non-empty [rows, images] "
            f"(or [images]) array; got shapes {[d.shape for d in strata]}"
        )
    return [np.atleast_2d(d) for d in strata]


def bootstrap_means(
    differences: Sequence[np.ndarray], *, resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """float [resamples]: the mean over all cells of each resample (the differences' units).

    Each resample draws, in every stratum, as many images as it has, with replacement, the same
    images for all of the stratum's rows. Vectorised: per stratum, the drawn images' column sums
    (over its rows) are gathered and summed for a block of resamples at a time.
    """
    strata = _strata(differences)
    if resamples < 1:
        raise ConfigError(f"need resamples >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for d in strata:
        images = d.shape[1]
        columns = d.sum(axis=0)  # the rows share the images: resample columns
        block = max(1, _DRAWS_PER_BLOCK // images)
        for start in range(0, resamples, block):
            stop = min(resamples, start + block)
            drawn = rng.integers(0, images, size=(stop - start, images))
            totals[start:stop] += columns[drawn].sum(axis=1)
    return totals / sum(d.size for d in strata)


def paired_bootstrap(
    differences: Sequence[np.ndarray],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    scale: float = POINTS,
) -> Interval:
    """Percentile interval of the mean of ``differences`` over all cells, times ``scale``.

    differences: one array per stratum, [rows, images] (a 1-D array is one row); the rows of a
    stratum share its images and are resampled together; strata keep their sizes, so each keeps
    its weight (its cells' share of all cells). scale: 100 (default) turns differences of
    correctness into percentage points; 1 keeps the differences' units. Deterministic given
    ``seed``.
    """
    if not 0 < level < 1:
        raise ConfigError(f"need 0 < level < 1, got {level}")
    strata = _strata(differences)
    means = bootstrap_means(strata, resamples=resamples, seed=seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    cells = sum(d.size for d in strata)
    estimate = sum(float(d.sum()) for d in strata) / cells
    return Interval(
        estimate=scale * estimate,
        low=scale * float(low),
        high=scale * float(high),
        level=level,
        resamples=resamples,
        n=int(sum(d.shape[1] for d in strata)),
    )
