"""ImageNet's 224 px preprocessing (timm's defaults: bicubic, crop 0.875, ImageNet mean and std).

The data config of the benchmarks' ImageNet-sized synthetic workloads: the dump benchmark's
photos and the store benchmark's manifest.
"""

from __future__ import annotations

IMAGENET_224 = {
    "input_size": [3, 224, 224],
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,
}
