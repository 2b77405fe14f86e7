"""The view-augmentation options (``AugmentConfig``), defined once for `fastkd dump` and `fastkd train`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from fastkd.augment import AugmentConfig

R = TypeVar("R")
_DEFAULT = AugmentConfig()
_PANEL = "View augmentation (RandomResizedCrop + flip, replayed from the seed)"

CropScale = Annotated[
    tuple[float, float],
    typer.Option(
        metavar="MIN MAX",
        help="Crop area range, as a fraction of the image's area, in (0, 1].",
        rich_help_panel=_PANEL,
    ),
]
CropRatio = Annotated[
    tuple[float, float],
    typer.Option(
        metavar="MIN MAX", help="Crop aspect-ratio range (width / height).", rich_help_panel=_PANEL
    ),
]
HFlip = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Probability of a horizontal flip per view, 0 to 1 (0 for data where mirroring "
        "changes the class, e.g. digits or text).",
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
        help="Side of the eval view's centre crop, as a fraction of the image's short side, "
        "in (0, 1].",
        rich_help_panel=_PANEL,
    ),
]

_OPTIONS = {  # parameter -> (its option, its default), in augment_config's order
    "crop_scale": (CropScale, _DEFAULT.scale),
    "crop_ratio": (CropRatio, _DEFAULT.ratio),
    "hflip": (HFlip, _DEFAULT.hflip),
    "eval_view": (EvalView, _DEFAULT.eval_view),
    "eval_crop_pct": (EvalCropPct, _DEFAULT.eval_crop_pct),
}


def with_view_options(command: Callable[..., R]) -> Callable[..., R]:
    """``command``, which takes ``augment: AugmentConfig``, with the view options in its place:
    typer lists the five options (one definition for every command), the command gets one
    ``AugmentConfig``; a bad value is a usage error naming the options."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "augment"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
        for name, (option, default) in _OPTIONS.items()
    ]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> R:
        augment = augment_config(*(kwargs.pop(name) for name in _OPTIONS))
        return command(*args, augment=augment, **kwargs)

    run.__signature__ = signature.replace(parameters=[*kept, *added])
    run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
    return run


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
