"""The view-augmentation options, shared by `fastkd dump` and `fastkd train` (``AugmentConfig``)."""

from __future__ import annotations

from typing import Annotated

import typer

from fastkd.views import AugmentConfig

_DEFAULT = AugmentConfig()
_PANEL = "View augmentation (RandomResizedCrop + flip, replayed from the seed)"

CropScale = Annotated[
    tuple[float, float],
    typer.Option(
        metavar="MIN MAX",
        help="Crop area range, as a fraction of the image.",
        rich_help_panel=_PANEL,
    ),
]
CropRatio = Annotated[
    tuple[float, float],
    typer.Option(metavar="MIN MAX", help="Crop aspect-ratio range.", rich_help_panel=_PANEL),
]
HFlip = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Probability of a horizontal flip (0 for data where mirroring changes the class, "
        "e.g. digits or text).",
        rich_help_panel=_PANEL,
    ),
]
EvalView = Annotated[
    bool,
    typer.Option(
        help="View 0 is the eval view: a centre square crop, no flip.", rich_help_panel=_PANEL
    ),
]
EvalCropPct = Annotated[
    float,
    typer.Option(
        help="Side of the eval view's centre crop, as a fraction of the short side.",
        rich_help_panel=_PANEL,
    ),
]

DEFAULT_SCALE = _DEFAULT.scale
DEFAULT_RATIO = _DEFAULT.ratio
DEFAULT_HFLIP = _DEFAULT.hflip
DEFAULT_EVAL_VIEW = _DEFAULT.eval_view
DEFAULT_EVAL_CROP_PCT = _DEFAULT.eval_crop_pct


def augment_config(
    crop_scale: tuple[float, float],
    crop_ratio: tuple[float, float],
    hflip: float,
    eval_view: bool,
    eval_crop_pct: float,
) -> AugmentConfig:
    """The options as an ``AugmentConfig``; a bad value is a usage error naming the options."""
    try:
        return AugmentConfig(
            scale=tuple(crop_scale),
            ratio=tuple(crop_ratio),
            hflip=hflip,
            eval_view=eval_view,
            eval_crop_pct=eval_crop_pct,
        )
    except ValueError as error:
        raise typer.BadParameter(
            f"{error} (--crop-scale, --crop-ratio, --hflip, --eval-crop-pct)"
        ) from None
