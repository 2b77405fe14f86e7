"""The input size: dump, training and evaluation log it per model, warn when it upscales the
data set's images more than 2x, and take an override that reaches the store's manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from fastkd.checkpoints import save_checkpoint
from fastkd.data import open_dataset
from fastkd.dump import DumpConfig, run_dump
from fastkd.evaluation import evaluate, predict_checkpoints
from fastkd.input_size import announce_input, describe_input, with_input_size
from fastkd.models import ModelSpec, load_model
from fastkd.store.manifest import open_manifest
from fastkd.training.config import TrainConfig

ARCH = "test_convnext"  # timm data config: 3x160x160, bicubic, crop 0.95


def _images(root: Path, side: int) -> Path:
    """Two classes of two ``side`` px images."""
    rng = np.random.default_rng(side)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain state dict of an untrained two-class model: its data config is timm's."""
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    import torch

    torch.save(timm.create_model(ARCH, num_classes=2).state_dict(), path)
    return path


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_with_input_size_sets_the_side_and_keeps_the_rest() -> None:
    config = {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bicubic"}
    assert with_input_size(config, 32) == {**config, "input_size": [3, 32, 32]}
    assert config["input_size"] == [3, 224, 224]  # a copy
    with pytest.raises(ValueError, match="--input-size must be >= 1"):
        with_input_size(config, 0)
    with pytest.raises(ValueError, match="--input-size must be >= 1"):
        TrainConfig(data=Path("d"), student="m", teachers="none", input_size=0)
    with pytest.raises(ValueError, match="--input-size must be >= 1"):
        DumpConfig(data=Path("d"), models=["m"], out=Path("o"), input_size=-3)


def test_log_line_names_size_source_interpolation_and_crop() -> None:
    config = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875}
    line = describe_input("resnet18", config, "timm data config")
    assert line == "resnet18: input 3x224x224 (timm data config), bicubic, crop 0.875"


def test_tiny_images_warn_once_large_ones_do_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875}
    tiny = open_dataset(_images(tmp_path / "tiny", 16))
    large = open_dataset(_images(tmp_path / "large", 200))
    with caplog.at_level(logging.INFO, logger="fastkd"):
        for _ in range(2):  # a run announces its models again and again: logged once
            announce_input("resnet18", config, "timm data config", tiny)
        announce_input("resnet18", config, "timm data config", large)
        announce_input("resnet18", with_input_size(config, 32), "--input-size", tiny)
    assert _messages(caplog, logging.WARNING) == [
        "resnet18: images are upscaled 14x (median 16 px -> 224 px); set --input-size"
    ]
    assert _messages(caplog, logging.INFO) == [
        "resnet18: input 3x224x224 (timm data config), bicubic, crop 0.875",
        "resnet18: input 3x224x224 (timm data config), bicubic, crop 0.875",
        "resnet18: input 3x32x32 (--input-size), bicubic, crop 0.875",
    ]


def test_dump_override_reaches_the_manifest_and_the_log(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _images(tmp_path / "data", 16)
    cfg = DumpConfig(
        data=data, models=[f"net:{ARCH}={checkpoint}"], out=tmp_path / "store", views=1,
        batch_size=4, backend="torch", num_workers=0, progress=False, input_size=32,
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fastkd"):
        run_dump(cfg)
    manifest, _ = open_manifest(cfg.out)
    assert manifest.models[0].data_config["input_size"] == [3, 32, 32]
    assert "net: input 3x32x32 (--input-size), bicubic, crop 0.95" in _messages(
        caplog, logging.INFO
    )
    assert not _messages(caplog, logging.WARNING)  # 32 px from 16 px: 2x

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        run_dump(DumpConfig(**{**vars(cfg), "out": tmp_path / "default", "input_size": None}))
    manifest, _ = open_manifest(tmp_path / "default")
    assert manifest.models[0].data_config["input_size"] == [3, 160, 160]
    assert _messages(caplog, logging.WARNING) == [
        "net: images are upscaled 10x (median 16 px -> 160 px); set --input-size"
    ]


def test_eval_override_reaches_the_data_config(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    dataset = open_dataset(_images(tmp_path / "data", 16))
    seen: list[dict] = []
    import fastkd.evaluation as evaluation

    real = evaluation.eval_view_outputs

    def spy(models, data_configs, *args, **kwargs):
        seen.extend(data_configs[name] for name in models)
        return real(models, data_configs, *args, **kwargs)

    monkeypatch.setattr(evaluation, "eval_view_outputs", spy)
    spec = ModelSpec.parse(f"ev:{ARCH}={checkpoint}")
    with caplog.at_level(logging.INFO, logger="fastkd"):
        found = predict_checkpoints(dataset, [spec], backend="torch", input_size=32)
    assert found["ev"].shape == (4,)
    assert seen[-1]["input_size"] == [3, 32, 32]
    assert "ev: input 3x32x32 (--input-size), bicubic, crop 0.95" in _messages(caplog, logging.INFO)

    loaded = load_model(spec)
    models, configs = {"ev2": loaded.model}, {"ev2": loaded.data_config}
    evaluate(models, configs, dataset, backend="torch", input_size=64)
    assert seen[-1]["input_size"] == [3, 64, 64]
    assert configs["ev2"]["input_size"] == [3, 160, 160]  # the caller's config is left alone


def test_a_checkpoint_data_config_is_named_as_such(tmp_path: Path) -> None:
    config = {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0}
    path = save_checkpoint(
        tmp_path / "m.pt", timm.create_model(ARCH, num_classes=2), ARCH, {"num_classes": 2}, config
    )
    loaded = load_model(ModelSpec.parse(f"{ARCH}={path}"))
    assert describe_input("m", loaded.data_config, loaded.input_source) == (
        "m: input 3x32x32 (checkpoint data config), bilinear, crop 1"
    )
    assert load_model(ModelSpec.parse(f"{ARCH}={path}"), input_size=48).data_config[
        "input_size"
    ] == [3, 48, 48]
