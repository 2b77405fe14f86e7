"""``fastkd train --preset``: each preset's values reach TrainConfig, an explicit flag wins, KL+DP's
lr scales with the batch, ``--lr NAME=VALUE`` sets one model's optimiser (fastkd.presets); what
a run's way of teaching does not read is left out of a preset and refused as a flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_pool import config, make_pool
from typer.testing import CliRunner

import fastkd.training
from fastkd.cli.main import app
from fastkd.errors import ConfigError
from fastkd.loss_settings import LOSS_FIELDS, TEACHING_READS, LossSettings
from fastkd.presets import PRESETS, PresetName, markdown_table, reads_table
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


def _joint_args(pool, tmp_path) -> list[str]:
    return [
        *("--data", str(pool.train), "--joint", "--out", str(tmp_path)),
        *("--model", pool.specs["a"], "--model", pool.specs["b"]),
    ]


@pytest.mark.parametrize("name", list(PresetName))
def test_each_preset_sets_its_table_values(pool, tmp_path, monkeypatch, name):
    """Each preset run as its paper's code trains (Bi-KD: --joint) applies every setting."""
    preset = PRESETS[name]
    args = _joint_args(pool, tmp_path) if preset.one_way else _args(pool, tmp_path)
    cfg, result = _train_config(monkeypatch, [*args, "--preset", name.value])
    assert result.exit_code == 0, result.output
    assert (cfg.preset, cfg.preset_not_applied) == (name.value, ())
    assert "not applied" not in result.output
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
    cfg, _ = _train_config(monkeypatch, [*_args(pool, tmp_path), *defaults])
    assert (cfg.epochs, cfg.loss.ce_weight, cfg.optimizer) == (10, 1.0, "adam")


def test_kl_dp_lr_scales_with_the_batch(pool, tmp_path, monkeypatch):
    args = [*_args(pool, tmp_path), "--preset", "kl-dp"]
    at_256, _ = _train_config(monkeypatch, [*args, "--batch-size", "256"])
    at_512, _ = _train_config(monkeypatch, [*args, "--batch-size", "512"])
    assert at_256.lr == pytest.approx(1e-4)
    assert at_512.lr == pytest.approx(2 * at_256.lr)


def test_bi_kd_turns_stop_grad_off_with_joint_unless_given(pool, tmp_path, monkeypatch):
    cfg, _ = _train_config(monkeypatch, [*_joint_args(pool, tmp_path), "--preset", "bi-kd"])
    assert cfg.loss.stop_grad is False and cfg.optimizer == "adam" and cfg.lr == 1e-6
    args = [*_joint_args(pool, tmp_path), "--preset", "bi-kd", "--stop-grad"]
    assert _train_config(monkeypatch, args)[0].loss.stop_grad is True


@pytest.mark.parametrize("teachers", ["offline", "live"])
def test_bi_kd_without_joint_is_offline_bi_kd_and_says_what_it_leaves_out(
    pool, tmp_path, monkeypatch, teachers
):
    """Stored and live teachers never learn: the preset's --no-stop-grad is left out (fastkd's
    default, what these runs do), the run says so and records it; the rest is applied."""
    args = [*_args(pool, tmp_path), "--preset", "bi-kd", "--teachers", teachers]
    cfg, result = _train_config(monkeypatch, args)
    assert result.exit_code == 0, result.output
    assert (cfg.preset, cfg.preset_not_applied, cfg.loss.stop_grad) == (
        "bi-kd",
        ("stop_grad",),
        True,
    )
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.loss.mode.value) == (
        "adam",
        1e-6,
        128,
        "live",
    )
    output = " ".join(result.output.split())
    assert "--preset bi-kd: runs Bi-KD one way (offline Bi-KD from a store)" in output
    assert f"not applied, as --teachers {teachers}" in output and "--no-stop-grad" in output
    # the given flag that agrees with what the run does is taken as given
    cfg, result = _train_config(monkeypatch, [*args, "--stop-grad"])
    assert (cfg.preset_not_applied, cfg.loss.stop_grad) == ((), True), result.output


def test_a_preset_with_teachers_none_leaves_out_the_kd_settings(pool, tmp_path, monkeypatch):
    """Cross-entropy alone reads no KD setting: kl-dp's CE weight 0 would be a lie there."""
    args = [*_args(pool, tmp_path), "--preset", "kl-dp", "--teachers", "none"]
    cfg, result = _train_config(monkeypatch, args)
    assert result.exit_code == 0, result.output
    assert set(cfg.preset_not_applied) == {
        "mode",
        "partition_score",
        "kd_weight",
        "ce_weight",
        "temperature",
    }
    assert cfg.loss == LossSettings() and (cfg.optimizer, cfg.epochs) == ("sgd", 20)
    assert "--ce-weight 0" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-stop-grad"], "--no-stop-grad: --teachers offline"),
        (["--preset", "bi-kd", "--no-stop-grad"], "only --joint trains the teaching model"),
        (["--teachers", "live", "--no-stop-grad"], "--no-stop-grad: --teachers live"),
        (["--teachers", "none", "--temperature", "2"], "--temperature 2: --teachers none"),
        (["--teachers", "none", "--ce-weight", "0.5"], "--ce-weight 0.5: --teachers none"),
    ],
)
def test_a_given_flag_the_run_does_not_apply_is_refused(
    pool, tmp_path, monkeypatch, extra, message
):
    cfg, result = _train_config(monkeypatch, [*_args(pool, tmp_path), *extra])
    assert cfg is None and result.exit_code == 2, (extra, result.output)
    assert message in " ".join(result.output.split()), (extra, result.output)


def test_joint_refuses_a_partition_flag_and_takes_the_one_it_runs(pool, tmp_path, monkeypatch):
    """Joint Bi-KD's partition is always live on p(y): --mode fixed is refused, live taken."""
    cfg, result = _train_config(monkeypatch, [*_joint_args(pool, tmp_path), "--mode", "fixed"])
    assert cfg is None and "--mode fixed: --joint" in " ".join(result.output.split())
    cfg, result = _train_config(monkeypatch, [*_joint_args(pool, tmp_path), "--mode", "live"])
    assert cfg is not None and cfg.preset is None, result.output


def test_the_read_settings_are_the_loss_configs_fields():
    """``TEACHING_READS`` (light, for the CLI) names the fields the kernels' configs take."""
    from fastkd.kernels import BidirectionalKDConfig, PartitionedKDConfig
    from fastkd.training.strategy import CrossEntropyOnly

    def loss_fields(config) -> set[str]:
        return {f.name for f in dataclasses.fields(config)} & set(LOSS_FIELDS) - {"reduction"}

    assert TEACHING_READS["joint"][0] == loss_fields(BidirectionalKDConfig)
    for teachers in ("offline", "live"):
        assert TEACHING_READS[teachers][0] == loss_fields(PartitionedKDConfig)
    assert TEACHING_READS["none"][0] == set() and not CrossEntropyOnly.distils


def test_without_a_preset_the_defaults_are_fastkds(pool, tmp_path, monkeypatch):
    cfg, _ = _train_config(monkeypatch, _args(pool, tmp_path))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fastkd's defaults
    defaults |= {f.name: f.default for f in dataclasses.fields(LossSettings)}
    for field in ("mode", "epochs", "batch_size", "optimizer", "weight_decay", "stop_grad"):
        assert getattr(cfg.loss if field in LOSS_FIELDS else cfg, field) == defaults[field], field
    assert cfg.lr is None and cfg.model_lr == {}
    assert (cfg.preset, cfg.preset_not_applied) == (None, ())


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


def test_method_doc_shows_the_preset_tables():
    text = (ROOT / "docs" / "method.md").read_text()
    assert markdown_table() in text and reads_table() in text


def test_a_presets_run_records_it_and_an_older_state_resumes(pool, tmp_path):
    """The run state's configuration names the preset and what it left out; a state an older
    fastkd wrote for --preset bi-kd offline (no preset field, stop_grad saved False, unread)
    resumes under today's command."""
    out = tmp_path / "run"
    args = ["train", *_args(pool, out), "--preset", "bi-kd", "--batch-size", "16", "--lr", "1e-3"]
    args += ["--backend", "torch", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "not applied, as --teachers offline" in " ".join(result.output.split())
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["config"]["preset"] == "bi-kd"
    assert state["config"]["preset_not_applied"] == ["stop_grad"]
    assert state["config"]["loss"]["stop_grad"] is True
    older = state["config"]
    del older["preset"], older["preset_not_applied"]
    older["loss"]["stop_grad"] = False
    torch.save(state, out / "state.pt")
    result = CliRunner().invoke(app, [*args, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["preset"] == "bi-kd"


def test_the_report_names_the_preset_and_what_it_left_out(pool, tmp_path):
    from fastkd.training.report import caveats, provenance

    cfg = config(pool, tmp_path, preset="bi-kd", preset_not_applied=("stop_grad",))
    context = provenance(cfg)
    assert (context["preset"], context["preset_not_applied"]) == ("bi-kd", ["stop_grad"])
    line = caveats(SimpleNamespace(context=context, control={}))[0]
    assert line.endswith(", preset bi-kd (not applied: stop_grad)")
    assert provenance(config(pool, tmp_path))["preset"] is None
    with pytest.raises(ConfigError, match="--preset must be one of"):
        config(pool, tmp_path, preset="bikd")
