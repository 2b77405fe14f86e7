"""Test predictions of one fold: the demo's unit of evidence, cached as JSON beside each run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldPredictions:
    """Each model's top-1 class on every test image of a fold.

    ``samples``: the images' indices in scikit-learn's digits (the same order in every file of a
    fold, so predictions pair by position); ``predictions``: model name -> class per image.
    """

    fold: int
    samples: list[int]
    labels: list[int]
    predictions: dict[str, list[int]]

    def correct(self, name: str) -> np.ndarray:
        """bool [images]: where model ``name`` is right."""
        return np.asarray(self.predictions[name]) == np.asarray(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FoldPredictions:
        return cls(
            fold=int(values["fold"]),
            samples=[int(s) for s in values["samples"]],
            labels=[int(y) for y in values["labels"]],
            predictions={k: [int(p) for p in v] for k, v in values["predictions"].items()},
        )
