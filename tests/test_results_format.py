"""A trained run's results load where users already are: timm's own checkpoint loader, a
``summary.csv`` as timm's train.py writes, TensorBoard scalars when tensorboard is installed.

One tiny pool for the module (``training_pool``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from training_pool import config, make_pool

from fastkd.models import ModelSpec, load_model
from fastkd.training import EpochRecord, ViewsRepeatWarning, train
from fastkd.training.summary import SUMMARY_FILE, TENSORBOARD_DIR, EpochSummary


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("pool"))


def test_timm_create_model_loads_a_trained_students_checkpoint(pool, tmp_path):
    result = train(config(pool, tmp_path))
    path = result.checkpoints["s"]
    saved = torch.load(path, weights_only=True)["state_dict"]
    model = timm.create_model("test_vit", checkpoint_path=str(path), num_classes=10, img_size=32)
    model.eval()
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    ours = load_model(ModelSpec("test_vit", path, "s")).model
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(images), ours(images))


def _rows(out_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (out_dir / SUMMARY_FILE).open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_summary_csv_has_a_row_per_epoch_and_resume_does_not_repeat_one(pool, tmp_path):
    cfg = config(pool, tmp_path, epochs=2, val_data=pool.val)
    result = train(cfg)
    header, rows = _rows(cfg.out_dir)
    assert header == ["epoch", "train_loss", "taught", "val_top1_s", "lr_s", "seconds"]
    assert len(rows) == len(result.history) == 2
    for row, record in zip(rows, result.history, strict=True):
        assert int(row["epoch"]) == record.epoch
        assert float(row["train_loss"]) == record.loss
        assert float(row["taught"]) == record.taught  # KD: a share of rows, never empty
        assert float(row["val_top1_s"]) == record.val_top1["s"]
        assert float(row["lr_s"]) == record.lr["s"] == pytest.approx(cfg.lr)
        assert float(row["seconds"]) == record.seconds

    with pytest.warns(ViewsRepeatWarning):  # 3 epochs over 2 stored views
        resumed = train(dataclasses.replace(cfg, epochs=3, resume=True))
    _, again = _rows(cfg.out_dir)
    assert [int(row["epoch"]) for row in again] == [1, 2, 3]
    assert again[:2] == rows  # restored from the run state, not appended twice
    assert float(again[2]["train_loss"]) == resumed.history[2].loss


def test_summary_without_kd_or_val_leaves_cells_empty_and_logs_tensorboard(tmp_path, monkeypatch):
    scalars: list[tuple[str, float, int]] = []

    class Writer:  # torch.utils.tensorboard.SummaryWriter's part that the summary uses
        def __init__(self, log_dir: str) -> None:
            assert log_dir == str(tmp_path / TENSORBOARD_DIR)

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    record = EpochRecord(1, 3, 0.5, math.nan, {}, 2.0, 1.5, {"x": 1e-3})
    with_val = dataclasses.replace(record, epoch=2, taught=0.25, val_top1={"x": 40.0})
    summary = EpochSummary(tmp_path, ["x"])
    summary.write([record])
    summary.write([record, with_val])
    _, rows = _rows(tmp_path)
    assert rows[0]["taught"] == rows[0]["val_top1_x"] == ""  # no KD, no val data: empty
    assert rows[1]["taught"] == "0.25" and rows[1]["val_top1_x"] == "40.0"
    assert scalars == [
        ("train/loss", 0.5, 1),
        ("lr", 1e-3, 1),
        ("train/loss", 0.5, 2),
        ("train/taught", 0.25, 2),
        ("val/top1/x", 40.0, 2),
        ("lr", 1e-3, 2),
    ]
