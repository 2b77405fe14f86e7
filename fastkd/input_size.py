"""The input size a model sees: set it (``with_input_size``), and say it (``announce_input``).

A model's timm data config fixes the side its images are resized to (224 px for most ImageNet
models). On small images (32 px digits, CIFAR) that upscales each image many times over: the
model computes on blurred pixels at 50x the cost. Dump, training and evaluation all print each
model's input size and warn on such upscaling through ``announce_input``, and all override the
size through ``with_input_size``, so the store's manifest, the training run and the evaluation
agree on one size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastkd.errors import ConfigError

if TYPE_CHECKING:
    from fastkd.data import ImageDataset

log = logging.getLogger(__name__)

TIMM_SOURCE = "timm data config"  # the architecture's pretrained config
CHECKPOINT_SOURCE = "checkpoint data config"  # a fastkd checkpoint's saved config
OVERRIDE_SOURCE = "--input-size"  # the user's override
DATA_CONFIG_SOURCE = "data config"  # a config the caller gave (``evaluation.evaluate``)
MAX_UPSCALE = 2.0  # median image side x this < input side: warn
_announced: set[tuple[str, str, int, tuple[int, ...]]] = set()  # (model, data, n, input size)


def with_input_size(data_config: Mapping[str, Any], size: int) -> dict[str, Any]:
    """``data_config`` with its image size set to ``size`` x ``size`` (channels kept); the one
    place dump, training and evaluation apply an input size override."""
    if size < 1:
        raise ConfigError(f"--input-size must be >= 1 (px), got {size}")
    channels = int(data_config.get("input_size", (3,))[0])
    return {**data_config, "input_size": [channels, int(size), int(size)]}


def describe_input(name: str, data_config: Mapping[str, Any], source: str) -> str:
    """``resnet18: input 3x224x224 (timm data config), bicubic, crop 0.875``."""
    size = "x".join(str(int(v)) for v in data_config.get("input_size", ()))
    parts = [f"{name}: input {size} ({source})"]
    if data_config.get("interpolation"):
        parts.append(str(data_config["interpolation"]))
    if data_config.get("crop_pct") is not None:
        parts.append(f"crop {data_config['crop_pct']:g}")
    return ", ".join(parts)


def upscale_factor(data_config: Mapping[str, Any], median_side: float) -> float:
    """How many times the input side is the data set's median image side."""
    side = max(int(v) for v in data_config["input_size"][1:])
    return side / max(median_side, 1.0)


def announce_input(
    name: str, data_config: Mapping[str, Any], source: str, dataset: ImageDataset
) -> None:
    """Log the model's input size, and warn when it upscales the data set's images more than
    ``MAX_UPSCALE`` times; once per model, data set and size in a process (a run evaluates its
    models again and again: the log says it once)."""
    size = tuple(int(v) for v in data_config.get("input_size", ()))
    key = (name, dataset.source, len(dataset), size)
    if key in _announced:
        return
    _announced.add(key)
    log.info("%s", describe_input(name, data_config, source))
    median = dataset.median_side()
    if median is None or len(size) < 3:
        return
    factor = upscale_factor(data_config, median)
    if factor > MAX_UPSCALE:
        log.warning(
            "%s: images are upscaled %.3gx (median %g px -> %d px); set --input-size",
            name, factor, median, max(size[1:]),
        )  # fmt: skip
