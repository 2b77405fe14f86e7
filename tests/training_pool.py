"""The tiny training pool the training tests share (test_training, test_sync_free, test_ddp).

Real digits at 32 px (47 training, 40 validation images), two random "pretrained" members with
different preprocessing (a ViT at 32 px, a ResNet at 24 px) and an outside student, dumped with
``fastkd.dump.run_dump`` (2 views, dense fp16 logits). Test modules import ``make_pool`` and
``config`` and make their own module-scoped ``pool`` fixture from ``make_pool``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import timm
import torch

from fastkd.checkpoints import save_checkpoint
from fastkd.digits import write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.loss_settings import LOSS_FIELDS, LossSettings
from fastkd.training import TrainConfig

VIT = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.9,
}
RESNET = {
    "input_size": [3, 24, 24],
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 1.0,
}


def _subset(folder: Path, per_class: int, drop: int = 0) -> Path:
    """A file list of the first images of each class, less the last ``drop``."""
    lines = [
        f"{c}/{png.name} {c}"
        for c in range(10)
        for png in sorted((folder / str(c)).glob("*.png"))[:per_class]
    ]
    lines = lines[: len(lines) - drop]
    path = folder / "subset.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_pool(root: Path) -> SimpleNamespace:
    """Digits subsets, three tiny checkpoints (members a, b; outside student s), a store of a, b."""
    digits = write_digits_folder(root / "digits", image_size=32)
    specs = {}
    for seed, (name, arch, kwargs, config) in enumerate(
        [
            ("a", "test_vit", {"img_size": 32}, VIT),
            ("b", "test_resnet", {}, RESNET),
            ("s", "test_vit", {"img_size": 32}, VIT),
        ]
    ):
        torch.manual_seed(seed)
        model = timm.create_model(arch, num_classes=10, **kwargs)
        path = save_checkpoint(
            root / f"{name}.pt", model, arch, {"num_classes": 10, **kwargs}, config
        )
        specs[name] = f"{name}:{arch}={path}"
    train_list = _subset(digits / "train", 5, drop=3)  # 47: batches of 16 end with 15 rows
    store = run_dump(
        DumpConfig(
            data=train_list,
            models=[specs["a"], specs["b"]],
            out=root / "store.zarr",
            views=2,
            batch_size=50,
            backend="torch",
            num_workers=0,
            progress=False,
        )
    )
    return SimpleNamespace(
        root=root,
        specs=specs,
        train=train_list,
        val=_subset(digits / "val", 4),
        store=store,
    )


def config(pool: SimpleNamespace, tmp_path: Path, **overrides) -> TrainConfig:
    values = {
        "data": pool.train,
        "student": pool.specs["s"],
        "store": pool.store,
        "models": (pool.specs["a"], pool.specs["b"]),
        "epochs": 1,
        "batch_size": 16,
        "lr": 1e-3,
        "out_dir": tmp_path / "run",
        "backend": "torch",
        "num_workers": 0,
        "progress": False,
        "report": False,
    }
    loss = {name: overrides.pop(name) for name in LOSS_FIELDS if name in overrides}
    values.update(overrides)
    return TrainConfig(**values, loss=LossSettings(**loss))
