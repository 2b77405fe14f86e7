"""The independent reference for a preprocessed view: torchvision's functional transforms."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


def reference_inputs(
    path: Path, box: tuple[int, int, int, int], flip: bool, data_config: dict
) -> torch.Tensor:
    """A view preprocessed by torchvision (the independent reference): float32 [3, H, W].

    ``resized_crop`` of the integer pixel box to the model's input size with its interpolation,
    then the flip, then ``to_tensor`` + normalise: timm's RandomResizedCrop / flip order.
    """
    interpolation = {
        "bilinear": TF.InterpolationMode.BILINEAR,
        "bicubic": TF.InterpolationMode.BICUBIC,
    }[data_config["interpolation"]]
    top, left, height, width = box
    with Image.open(path) as image:
        view = TF.resized_crop(
            image.convert("RGB"),
            top,
            left,
            height,
            width,
            size=list(data_config["input_size"][1:]),
            interpolation=interpolation,
            antialias=True,
        )
    if flip:
        view = TF.horizontal_flip(view)
    tensor = TF.to_dtype(TF.to_image(view), torch.float32, scale=True)
    return TF.normalize(tensor, mean=data_config["mean"], std=data_config["std"])
