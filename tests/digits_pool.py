"""Shared fixtures for the data, model and dump tests: the digits as image folders and a small pool
of real timm models trained for a few steps on them (so their logits mean something).

Test modules load this with ``pytest_plugins = ("digits_pool",)`` (and import nothing from it
at run time, so pytest can rewrite its asserts); the fixtures are session-wide, so the digits are
written and the pool trained once per test run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from fastkd.checkpoints import save_checkpoint
from fastkd.digits import write_digits_folder

IMAGES_PER_CLASS = 6  # digits_small: 60 images, enough for several blocks and batches
TRAIN_STEPS = 30
TRAIN_BATCH = 32


@dataclass(frozen=True)
class PoolMember:
    spec: str  # "[alias:]NAME=CKPT" as given to --model
    name: str  # its name in the store
    arch: str
    checkpoint: Path
    data_config: dict


# Two members with different input sizes, interpolations and normalisations, so every model's
# own preprocessing of the same view is exercised.
_MEMBERS = {
    "convnext": (
        "test_convnext",
        {"num_classes": 10},
        {
            "input_size": [3, 32, 32],
            "interpolation": "bilinear",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
    ),
    "effnet": (
        "test_efficientnet",
        {"num_classes": 10},
        {
            "input_size": [3, 40, 40],
            "interpolation": "bicubic",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "crop_pct": 0.875,
            "crop_mode": "center",
        },
    ),
}


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full digits image folder (train/val/test splits of 32 px RGB PNGs)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_small(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image class folder: the first IMAGES_PER_CLASS validation images of each digit."""
    root = tmp_path_factory.mktemp("digits_small")
    for folder in sorted((digits_root / "val").iterdir()):
        (root / folder.name).mkdir()
        for image in sorted(folder.iterdir())[:IMAGES_PER_CLASS]:
            shutil.copy(image, root / folder.name / image.name)
    return root


def _train_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted((root / "train").rglob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([int(f.parent.name) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, labels


@pytest.fixture(scope="session")
def digit_pool(digits_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[PoolMember]:
    """Two timm models trained for TRAIN_STEPS on the digits, saved as fastkd checkpoints."""
    folder = tmp_path_factory.mktemp("pool")
    images, labels = _train_images(digits_root)
    generator = torch.Generator().manual_seed(0)
    members = []
    for name, (arch, kwargs, config) in _MEMBERS.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, **kwargs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(config["std"]).view(1, 3, 1, 1)
        for _ in range(TRAIN_STEPS):
            batch = torch.randint(0, len(images), (TRAIN_BATCH,), generator=generator)
            x = F.interpolate(images[batch], size=config["input_size"][1:], mode="bilinear")
            loss = F.cross_entropy(model((x - mean) / std), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        path = save_checkpoint(folder / f"{name}.pt", model, arch, kwargs, config)
        members.append(PoolMember(f"{arch}={path}", name, arch, path, config))
    return members
