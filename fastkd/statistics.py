"""Intervals for paired comparisons on shared test images: a stratified, paired bootstrap.

Two sets of predictions on the same images (an arm and its control, or a model after and before)
give per image a difference; what varies from one test set to another is which images were
drawn. So the images are resampled, within each stratum (a cross-validation fold: every image is
in exactly one fold's test set), and every row of a stratum (members, seeds: the units that share
those images) takes the same resampled images, keeping their pairing. Percentile interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fastkd.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A mean difference and its bootstrap interval, in the differences' own units."""

    estimate: float  # the mean over every (row, image) cell of the data itself
    low: float
    high: float
    level: float
    resamples: int
    images: int

    def verdict(self) -> str:
        """What the interval supports, and nothing more: "better" when it lies above 0,
        "worse" below 0, else "no difference detected" (which is not "equal")."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference detected"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    differences: Sequence[np.ndarray],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile interval of the mean of ``differences`` over all cells.

    differences: one array per stratum, [rows, images] (a 1-D array is one row); the rows of a
    stratum share its images and are resampled together. Each resample draws every stratum's
    images with replacement (as many as it has), so each stratum keeps its weight.
    """
    strata = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in differences]
    if not strata or any(d.size == 0 for d in strata):
        raise ConfigError("paired_bootstrap needs at least one non-empty stratum")
    if resamples < 1 or not 0 < level < 1:
        raise ConfigError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    cells = sum(d.size for d in strata)
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for d in strata:
        images = d.shape[1]
        column_sums = d.sum(axis=0)  # rows share the images: resample columns
        counts = rng.multinomial(images, np.full(images, 1.0 / images), size=resamples)
        totals += counts @ column_sums
    means = totals / cells
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    estimate = float(sum(d.sum() for d in strata) / cells)
    return Interval(
        estimate=estimate,
        low=float(low),
        high=float(high),
        level=level,
        resamples=resamples,
        images=int(sum(d.shape[1] for d in strata)),
    )
