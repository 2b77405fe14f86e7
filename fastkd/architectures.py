"""fastkd's own timm architecture, the demo pool's mixer, and its one explicit registration.

timm knows a model by the name it was registered under. ``fastkd_mlp_mixer`` is not timm's own,
so ``register()`` adds it to timm's registry; ``fastkd.models.load_model`` calls it before it
builds any model, so a checkpoint of the demo's pool loads from the library as from every
command. Nothing registers on import: timm is imported by the modules that build models, never
by ``fastkd --help``.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import build_model_with_cfg, register_model
from timm.models.mlp_mixer import MlpMixer

from fastkd.errors import ConfigError

__all__ = ["MIXER", "fastkd_mlp_mixer", "register"]

MIXER = "fastkd_mlp_mixer"  # the name timm knows it by, once registered


def fastkd_mlp_mixer(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """timm's MLP-Mixer with every size open (``img_size``, ``patch_size``, ``num_blocks``,
    ``embed_dim``, ...): timm's registered mixers fix the patch, depth and width, so none fits a
    16 px input. No pretrained weights; the default data config follows ``img_size``."""
    if pretrained:
        raise ConfigError("fastkd_mlp_mixer has no pretrained weights: train it from scratch")
    size = int(kwargs.get("img_size", 224))
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {
        "input_size": (3, size, size),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stem.proj",
        "classifier": "head",
    }
    return build_model_with_cfg(MlpMixer, MIXER, pretrained=False, **kwargs)


def register() -> None:
    """Make ``fastkd_mlp_mixer`` a timm model name. Idempotent: once registered, a call does
    nothing (timm would warn on a second registration of the name)."""
    if not timm.is_model(MIXER):
        register_model(fastkd_mlp_mixer)
