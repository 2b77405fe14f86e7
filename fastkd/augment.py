"""``AugmentConfig``: the view augmentation's settings, apart from the replay that uses them.

A module that imports nothing heavy, so the CLI's view options take their defaults from it at
start-up without numpy or torch; ``fastkd.views`` replays the views it describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastkd.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Training-view augmentation; stored in the manifest (``dataclasses.asdict``)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_view: bool = True  # view 0: centre square crop of eval_crop_pct x short side, no flip
    eval_crop_pct: float = 0.875

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                "crop scale (--crop-scale) must satisfy 0 < min <= max <= 1, got "
                f"{_pair(self.scale)}"
            )
        lo, hi = self.ratio
        if not (0 < lo <= hi and math.isfinite(hi) and math.isfinite(lo)):
            raise ConfigError(
                "crop ratio (--crop-ratio) must be finite with 0 < min <= max, got "
                f"{_pair(self.ratio)}"
            )
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"flip probability (--hflip) must be in [0, 1], got {self.hflip}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ConfigError(
                f"eval crop (--eval-crop-pct) must be in (0, 1], got {self.eval_crop_pct}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        """Inverse of ``asdict`` (the manifest stores tuples as JSON lists)."""
        return cls(
            scale=tuple(values["scale"]),
            ratio=tuple(values["ratio"]),
            hflip=float(values["hflip"]),
            eval_view=bool(values["eval_view"]),
            eval_crop_pct=float(values["eval_crop_pct"]),
        )


def _pair(values: tuple[float, float]) -> str:
    return " ".join(f"{v:g}" for v in values)
