"""``fastkd train --preset``: each preset's values reach TrainConfig, an explicit flag wins, KL+DP's
lr scales with the batch, ``--lr NAME=VALUE`` sets one model's optimiser (fastkd.presets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from training_pool import config, make_pool
from typer.testing import CliRunner

import fastkd.training
from fastkd.cli.main import app
from fastkd.loss_settings import LOSS_FIELDS, LossSettings
from fastkd.presets import PRESETS, PresetName, markdown_table
from fastkd.training import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("pool"))


def _train_config(monkeypatch, args: list[str]):
    """The TrainConfig `fastkd train ARGS` builds (training itself replaced), and the result."""
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return SimpleNamespace(checkpoints={}, report=None)

    monkeypatch.setattr(fastkd.training, "train", fake_train)
    result = CliRunner().invoke(app, ["train", *args])
    return seen.get("cfg"), result


def _args(pool, tmp_path) -> list[str]:
    return [
        *("--data", str(pool.train), "--store", str(pool.store), "--student", pool.specs["s"]),
        *("--model", pool.specs["a"], "--model", pool.specs["b"], "--out", str(tmp_path)),
    ]


@pytest.mark.parametrize("name", list(PresetName))
def test_each_preset_sets_its_table_values(pool, tmp_path, monkeypatch, name):
    preset = PRESETS[name]
    cfg, result = _train_config(monkeypatch, [*_args(pool, tmp_path), "--preset", name.value])
    assert result.exit_code == 0, result.output
    for field, setting in preset.settings.items():
        value = getattr(cfg.loss if field in LOSS_FIELDS else cfg, field)
        if field == "lr" and preset.lr_batch:
            assert value == pytest.approx(setting.value * cfg.batch_size / preset.lr_batch)
        else:
            assert getattr(value, "value", value) == setting.value, field


def test_kl_dp_spot_checks_and_explicit_flags_win(pool, tmp_path, monkeypatch):
    cfg, _ = _train_config(monkeypatch, [*_args(pool, tmp_path), "--preset", "kl-dp"])
    assert cfg.loss.ce_weight == 0 and cfg.optimizer == "sgd" and cfg.weight_decay == 1e-4
    assert cfg.loss.mode.value == "fixed" and cfg.epochs == 20
    explicit = ["--preset", "kl-dp", "--lr", "0.01", "--ce-weight", "0.5", "--epochs", "3"]
    cfg, _ = _train_config(monkeypatch, [*_args(pool, tmp_path), *explicit])
    assert (cfg.lr, cfg.loss.ce_weight, cfg.epochs, cfg.optimizer) == (0.01, 0.5, 3, "sgd")
    # a flag given with fastkd's own default still wins: given is not the same as default
    defaults = ["--preset", "kl-dp", "--epochs", "10", "--ce-weight", "1", "--optimizer", "adam"]
    cfg, _ = _train_config(monkeypatch, [*_args(pool, tmp_path), *defaults, "--no-stop-grad"])
    assert (cfg.epochs, cfg.loss.ce_weight, cfg.optimizer, cfg.loss.stop_grad) == (
        10,
        1.0,
        "adam",
        False,
    )


def test_kl_dp_lr_scales_with_the_batch(pool, tmp_path, monkeypatch):
    args = [*_args(pool, tmp_path), "--preset", "kl-dp"]
    at_256, _ = _train_config(monkeypatch, [*args, "--batch-size", "256"])
    at_512, _ = _train_config(monkeypatch, [*args, "--batch-size", "512"])
    assert at_256.lr == pytest.approx(1e-4)
    assert at_512.lr == pytest.approx(2 * at_256.lr)


def test_bi_kd_turns_stop_grad_off_unless_given(pool, tmp_path, monkeypatch):
    cfg, _ = _train_config(monkeypatch, [*_args(pool, tmp_path), "--preset", "bi-kd"])
    assert cfg.loss.stop_grad is False and cfg.optimizer == "adam" and cfg.lr == 1e-6
    args = [*_args(pool, tmp_path), "--preset", "bi-kd", "--stop-grad"]
    assert _train_config(monkeypatch, args)[0].loss.stop_grad is True


def test_without_a_preset_the_defaults_are_fastkds(pool, tmp_path, monkeypatch):
    cfg, _ = _train_config(monkeypatch, _args(pool, tmp_path))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fastkd's defaults
    defaults |= {f.name: f.default for f in dataclasses.fields(LossSettings)}
    for field in ("mode", "epochs", "batch_size", "optimizer", "weight_decay", "stop_grad"):
        assert getattr(cfg.loss if field in LOSS_FIELDS else cfg, field) == defaults[field], field
    assert cfg.lr is None and cfg.model_lr == {}


def test_per_model_lr_in_joint_mode_reaches_the_optimisers(pool, tmp_path):
    cfg = config(
        pool, tmp_path, joint=True, student=None, store=None, model_lr={"a": 1e-3, "b": 2e-3}
    )
    trainer = Trainer(cfg)
    lrs = {learner.name: learner.optimizer.param_groups[0]["lr"] for learner in trainer.learners}
    assert lrs == {"a": 1e-3, "b": 2e-3}


def test_per_model_lr_from_the_cli_and_an_unknown_name_refused(pool, tmp_path, monkeypatch):
    args = [*_args(pool, tmp_path), "--lr", "s=1e-3", "--lr", "5e-4"]
    cfg, result = _train_config(monkeypatch, args)
    assert result.exit_code == 0, result.output
    assert cfg.model_lr == {"s": 1e-3} and cfg.lr == 5e-4
    assert cfg.lr_for("s") == 1e-3 and cfg.lr_for("a") == 5e-4
    for extra, message in (
        (["--lr", "a=1e-3"], "'a' does not train in this run; the trained models are 's'"),
        (["--lr", "zz=1e-3"], "'zz' does not train in this run"),
        (["--lr", "1e-3", "--lr", "2e-3"], "the run already has a learning rate"),
        (["--lr", "s=1e-3", "--lr", "s=2e-3"], "model 's' already has a learning rate"),
        (["--preset", "kl-dp", "--joint"], "--preset kl-dp is one-way KL+DP"),
    ):
        cfg, result = _train_config(monkeypatch, [*_args(pool, tmp_path), *extra])
        assert cfg is None and result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)


def test_method_doc_shows_the_preset_table():
    assert markdown_table() in (ROOT / "docs" / "method.md").read_text()
