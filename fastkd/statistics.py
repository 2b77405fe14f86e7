"""Intervals for paired comparisons on shared test images: a stratified, paired bootstrap.

Two sets of predictions on the same images (an arm and its control, or a model after and before)
give per image a difference of correctness, 1, 0 or -1. What would vary from one test set to
another is which images were drawn, so the images are what is resampled: within each stratum (a
cross-validation fold: every image is in exactly one fold's test set, so each fold keeps its
size), and every row of a stratum (members, seeds: the units that were tested on those images)
takes the same resampled images, which keeps their pairing. Where a stratum also has several
training seeds (a [rows, seeds, images] array: runs that differ only in their seed), the seeds
are resampled too, within the stratum, before the images (a two-level, hierarchical bootstrap),
so the interval covers the spread of training as well as the drawing of test images. The
statistic is the mean over all cells, in points (x 100) by default; the interval is the
bootstrap's percentile interval. docs/metrics.md explains the choices.
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
    seeds: int = 1  # training seeds per stratum, resampled too when > 1 (hierarchical)

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
    """Each stratum as [rows, seeds, images] (a 1-D array is one row of one seed, a 2-D array
    rows of one seed)."""
    strata = [np.asarray(d, dtype=np.float64) for d in differences]
    if not strata or any(d.ndim not in (1, 2, 3) or d.size == 0 for d in strata):
        raise ConfigError(
            "paired_bootstrap needs at least one stratum, each a non-empty [rows, seeds, "
            f"images], [rows, images] or [images] array; got shapes {[d.shape for d in strata]}"
        )
    out = []
    for d in strata:
        d = np.atleast_2d(d)
        out.append(d[:, None, :] if d.ndim == 2 else d)
    return out


def _seed_counts(strata: Sequence[np.ndarray]) -> int:
    counts = {d.shape[1] for d in strata}
    if len(counts) != 1:
        raise ConfigError(f"every stratum needs the same number of seeds, got {sorted(counts)}")
    return counts.pop()


def bootstrap_means(
    differences: Sequence[np.ndarray], *, resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """float [resamples]: the mean over all cells of each resample (the differences' units).

    Each resample draws, in every stratum, as many seeds as it has (when more than one), then as
    many images as it has, each with replacement; the drawn images are the same for all of the
    stratum's rows and drawn seeds. Vectorised: per stratum, the drawn seeds' column sums (over
    the rows) are gathered at the drawn images, for a block of resamples at a time.
    """
    strata = _strata(differences)
    if resamples < 1:
        raise ConfigError(f"need resamples >= 1, got {resamples}")
    _seed_counts(strata)
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for d in strata:
        seeds, images = d.shape[1:]
        columns = d.sum(axis=0)  # [seeds, images]: the rows share the seeds and images
        block = max(1, _DRAWS_PER_BLOCK // (images * seeds))
        for start in range(0, resamples, block):
            stop = min(resamples, start + block)
            drawn_seeds = None
            if seeds > 1:
                drawn_seeds = rng.integers(0, seeds, size=(stop - start, seeds))
            drawn = rng.integers(0, images, size=(stop - start, images))
            if drawn_seeds is None:
                totals[start:stop] += columns[0][drawn].sum(axis=1)
            else:  # the drawn seeds' columns summed, [block, images], at the drawn images
                chosen = columns[drawn_seeds].sum(axis=1)
                totals[start:stop] += np.take_along_axis(chosen, drawn, axis=1).sum(axis=1)
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

    differences: one array per stratum, [rows, seeds, images] or [rows, images] (one seed) or
    [images]; the rows of a stratum share its seeds and images and are resampled together; more
    than one seed: seeds are resampled as well as images; strata keep their sizes, so each keeps
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
        n=int(sum(d.shape[2] for d in strata)),
        seeds=_seed_counts(strata),
    )
