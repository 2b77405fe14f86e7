"""Training from stored targets: the rows it reads, the loss it takes, resume, bad input.

One tiny pool for the module (``training_pool``): real digits at 32 px (47 training, 40
validation images), two random "pretrained" members with different preprocessing (a ViT at 32 px,
a ResNet at 24 px) and an outside student, dumped with ``fastkd.dump.run_dump`` (2 views, dense
fp16 logits).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from file_edits import same_size_other_png
from PIL import Image
from training_pool import VIT, _subset, config, make_pool
from typer.testing import CliRunner

from fastkd.augment import AugmentConfig
from fastkd.cli.main import app
from fastkd.dump import DumpConfig, run_dump
from fastkd.errors import ConfigError
from fastkd.kernels import partitioned_kd_loss
from fastkd.loss_settings import LOSS_FIELDS, LossSettings
from fastkd.models import CheckpointError, ModelSpec, load_model
from fastkd.outputs import claim_output_folder
from fastkd.partition import logits_score, select_teacher
from fastkd.store import StoreMismatchError
from fastkd.targets import pool_targets
from fastkd.training import (
    NonFiniteError,
    TrainConfig,
    Trainer,
    ViewsRepeatWarning,
    train,
    train_all,
)
from fastkd.views import epoch_order, epoch_views, view_boxes, view_params


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("pool"))


def _pil_view(path: Path, box, flip: bool, data_config: dict) -> torch.Tensor:
    """The independent image reference: PIL crop, resize, flip, then timm's normalisation."""
    top, left, h, w = (int(v) for v in box)
    _, height, width = data_config["input_size"]
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    with Image.open(path) as image:
        crop = image.convert("RGB").crop((left, top, left + w, top + h))
    crop = crop.resize((width, height), resample[data_config["interpolation"]])
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(data_config["mean"]).view(3, 1, 1)
    std = torch.tensor(data_config["std"]).view(3, 1, 1)
    return (pixels - mean) / std


def test_offline_step_reads_the_replayed_views_and_their_stored_rows(pool, tmp_path):
    trainer = Trainer(config(pool, tmp_path, student=pool.specs["a"], models=()))
    plan = trainer.plan(0)
    order = epoch_order(0, 0, 47)
    assert np.array_equal(plan.samples, order)
    assert np.array_equal(plan.views, epoch_views(0, 0, order, 2))
    assert plan.rows_per_step == [16, 16, 15] == plan.global_rows

    batch = next(trainer.batches(plan))
    samples, views = order[:16], plan.views[:16]
    assert np.array_equal(batch.samples, samples)

    group = zarr.open_group(pool.store, mode="r")
    sizes = group["sizes"][:]
    boxes, flips = view_boxes(0, samples, 2, sizes[samples], AugmentConfig())
    rows = np.arange(16)
    for row in (0, 7, 15):  # images: the stored view of that sample, rebuilt independently
        path = pool.train.parent / trainer.dataset.keys[samples[row]]
        expected = _pil_view(path, boxes[row, views[row]], flips[row, views[row]], VIT)
        torch.testing.assert_close(batch.images[0][row], expected, atol=1e-5, rtol=0)
    assert np.array_equal(group["boxes"][:][samples, views], boxes[rows, views])

    # Targets: exactly the store's rows of those (sample, view) pairs, member by member.
    assert (
        trainer.teaching.members == ["b"] and trainer.teaching.self_index is None
    )  # a never teaches itself
    for column, name in enumerate(trainer.teaching.members):
        stored = group[f"models/{name}"]
        pairs = zip(samples, views, strict=True)
        logprobs = np.stack([stored["logprobs"][s, v] for s, v in pairs])
        assert np.array_equal(batch.targets.logprobs[:, column].numpy(), logprobs)
        assert np.array_equal(
            batch.targets.true_logprob[:, column].numpy(),
            stored["true_logprob"][:][samples, views],
        )
    assert torch.equal(batch.labels, torch.as_tensor(group["labels"][:][samples]))


@pytest.mark.parametrize(
    ("mode", "student", "members", "self_index", "score"),
    [
        ("live", "s", ["a", "b"], None, "label"),
        ("best", "a", ["b"], None, "label"),
        ("fixed", "a", ["b", "a"], 1, "label"),
        ("plain", "s", ["a", "b"], None, "label"),
        ("fixed", "a", ["b", "a"], 1, "confidence"),
        ("live", "s", ["a", "b"], None, "confidence"),
    ],
)
def test_each_partition_mode_chooses_as_the_partition_rule(
    pool, tmp_path, mode, student, members, self_index, score
):
    trainer = Trainer(
        config(
            pool, tmp_path, student=pool.specs[student], models=(), mode=mode,
            partition_score=score,
        )
    )  # fmt: skip
    assert (trainer.teaching.members, trainer.teaching.self_index) == (members, self_index)
    batch = next(trainer.batches(trainer.plan(0)))
    _, stats, (logits,) = trainer.loss(batch)
    if mode == "plain":  # the teachers' mixture, one column, on every row
        assert (stats.chosen == 0).all()
        # made where the rows are read, it is the loss of the stored columns (fp64 reference)
        rows = trainer.reader.read_pool(members, batch.samples, batch.views)
        loss, _ = trainer.loss(batch)[:2]
        expected, _ = partitioned_kd_loss(
            logits.detach().double(), batch.labels, pool_targets(rows), trainer.cfg.loss
        )
        torch.testing.assert_close(loss.double(), expected * len(batch.labels), rtol=1e-4, atol=0)
        return
    expected = select_teacher(
        batch.targets.partition_scores(score),
        mode,
        student_score=logits_score(logits.detach(), batch.labels, score),
        self_index=self_index,
    )
    assert torch.equal(stats.chosen, expected)
    if mode == "fixed" and score == "label":  # the teacher on some rows, the stored self elsewhere
        assert set(stats.chosen.tolist()) == {0, 1}
    if mode == "best":  # best-teacher KD: the best teacher on every row
        assert (stats.chosen == 0).all()


def test_plain_mode_and_confidence_score_with_live_teachers(pool, tmp_path):
    """Live teachers' targets take the same options: plain KD is the same loss as offline (fp16
    storage apart), and the confidence score partitions them too."""
    for options in (
        {"mode": "plain"},
        {"mode": "fixed", "partition_score": "confidence", "student": pool.specs["a"]},
    ):
        offline = Trainer(config(pool, tmp_path, **options))
        live = Trainer(config(pool, tmp_path, teachers="live", **options))
        loss_offline, stats_offline, _ = offline.loss(next(offline.batches(offline.plan(0))))
        loss_live, stats_live, _ = live.loss(next(live.batches(live.plan(0))))
        torch.testing.assert_close(loss_live, loss_offline, rtol=2e-3, atol=0)
        assert torch.equal(stats_live.chosen, stats_offline.chosen)


def test_joint_refuses_the_confidence_score(pool, tmp_path):
    with pytest.raises(ValueError, match="--partition-score: joint Bi-KD"):
        config(pool, tmp_path, joint=True, partition_score="confidence")


def test_loss_decreases_over_a_few_steps(pool, tmp_path):
    trainer = Trainer(config(pool, tmp_path))
    batch = next(trainer.batches(trainer.plan(0)))
    losses = [trainer.train_step(batch).result().loss for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert trainer.step == 6


def test_resume_is_bit_exact(pool, tmp_path):
    straight = train(config(pool, tmp_path / "straight", epochs=2))
    first = config(pool, tmp_path / "broken", epochs=1)
    train(first)
    resumed = train(dataclasses.replace(first, epochs=2, resume=True))
    a = torch.load(straight.state, weights_only=True)
    b = torch.load(resumed.state, weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 6)
    for key, tensor in a["learners"]["s"]["model"].items():
        assert torch.equal(tensor, b["learners"]["s"]["model"][key]), key
    moments = a["learners"]["s"]["optimizer"]["state"], b["learners"]["s"]["optimizer"]["state"]
    for index, state in moments[0].items():
        assert torch.equal(state["exp_avg_sq"], moments[1][index]["exp_avg_sq"])
    assert [r.loss for r in straight.history] == [r.loss for r in resumed.history]

    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.01"):
        train(dataclasses.replace(first, epochs=2, resume=True, lr=1e-2))
    hotter = dataclasses.replace(first.loss, temperature=2.0)  # a loss setting, by its path
    with pytest.raises(
        ValueError, match=r"with another configuration: loss\.temperature: 1\.0 -> 2\.0$"
    ):
        train(dataclasses.replace(first, epochs=2, resume=True, loss=hotter))
    with pytest.raises(FileExistsError, match="resume"):
        train(first)


def test_stored_targets_read_without_a_ring_are_the_stores_rows(pool, tmp_path):
    """``StoredTargets.read`` as the benchmarks call it (no pinned ring): the host tensors of
    exactly the store's rows."""
    trainer = Trainer(config(pool, tmp_path, student=pool.specs["a"], models=()))
    samples, views = np.array([3, 0, 46]), np.array([1, 0, 1])
    targets = trainer.teaching.read(samples, views)
    stored = zarr.open_group(pool.store, mode="r")["models/b"]
    expected = np.stack([stored["logprobs"][s, v] for s, v in zip(samples, views, strict=True)])
    assert np.array_equal(targets.logprobs[:, 0].numpy(), expected)


def test_live_teachers_match_the_stored_targets(pool, tmp_path):
    offline = Trainer(config(pool, tmp_path))
    live = Trainer(config(pool, tmp_path, teachers="live"))
    assert live.teaching.members == offline.teaching.members == ["a", "b"]
    assert len(live.streams.configs) == 2  # the ResNet reads its own 24 px stream of the same view
    batch = next(offline.batches(offline.plan(0)))
    loss_offline = offline.loss(batch)[0]
    live_batch = next(live.batches(live.plan(0)))
    loss_live = live.loss(live_batch)[0]
    torch.testing.assert_close(loss_live, loss_offline, rtol=2e-3, atol=0)  # fp16 storage
    torch.testing.assert_close(
        live.teaching.live_targets(live_batch).logprobs,
        batch.targets.logprobs,
        rtol=0,
        atol=2e-3,
    )


def test_a_sparse_store_trains_with_its_tail_model(pool, tmp_path):
    """Top-3 of 10 classes with the sampled tail: training reads the store's tail model and rows
    (ids, draws, tail masses) and steps on them."""
    store = run_dump(
        DumpConfig(
            data=pool.train, models=[pool.specs["a"], pool.specs["b"]], out=tmp_path / "sparse",
            views=2, topk=3, tail="sampled", tail_samples=4, batch_size=50, backend="torch",
            num_workers=0, progress=False,
        )
    )  # fmt: skip
    trainer = Trainer(config(pool, tmp_path, store=store))
    batch = next(trainer.batches(trainer.plan(0)))
    targets = batch.targets
    assert targets.is_sparse and targets.tail.value == "sampled" and targets.topk == 3
    samples, views = batch.samples, batch.views
    group = zarr.open_group(store, mode="r")
    for column, name in enumerate(trainer.teaching.members):
        stored = group[f"models/{name}"]
        for field in ("topk_ids", "tail_ids", "log_tail", "log_tail_sqrt", "true_logprob"):
            rows = stored[field][:][samples, views]
            assert np.array_equal(getattr(targets, field)[:, column].numpy(), rows), field
    loss = trainer.loss(batch)[0]
    assert torch.isfinite(loss)


def test_joint_bidirectional_step_matches_the_formula(pool, tmp_path):
    trainer = Trainer(config(pool, tmp_path, joint=True, student=None, store=None, views=2))
    batch = next(trainer.batches(trainer.plan(0)))
    loss, _, logits = trainer.loss(batch)
    # Bi-KD (docs/method.md) in fp64: CE of both + per row KL(p_teacher || p_learner), A teaches on
    # p_A(y) > p_B(y), B otherwise.
    za, zb = (z.detach().double() for z in logits)
    y = batch.labels
    la, lb = za.log_softmax(1), zb.log_softmax(1)
    pa, pb = la.gather(1, y[:, None])[:, 0], lb.gather(1, y[:, None])[:, 0]
    kl_ab = (la.exp() * (la - lb)).sum(1)
    kl_ba = (lb.exp() * (lb - la)).sum(1)
    expected = -(pa + pb) + torch.where(pa > pb, kl_ab, kl_ba)
    torch.testing.assert_close(loss.double(), expected.sum(), rtol=1e-5, atol=1e-5)

    before = [p.detach().clone() for p in trainer.learners[1].model.parameters()]
    trainer.train_step(batch)
    after = list(trainer.learners[1].model.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_cross_entropy_from_scratch_writes_a_loadable_checkpoint(pool, tmp_path):
    cfg = config(
        pool,
        tmp_path,
        student="tiny:test_vit",
        store=None,
        models=(),
        teachers="none",
        pretrained=False,
        model_kwargs={"img_size": 32},
        input_size=32,
        views=2,
        epochs=2,
        val_data=pool.val,
        report=True,
    )
    trainer = Trainer(cfg)
    plan = trainer.plan(1)
    boxes, flips = trainer.planner.view_boxes(plan.samples, plan.views)
    all_boxes, all_flips = view_params(
        0, plan.samples, 2, trainer.dataset.sizes[plan.samples], cfg.augment
    )
    rows = np.arange(len(plan.samples))
    assert np.array_equal(boxes, all_boxes[rows, plan.views])
    assert np.array_equal(flips, all_flips[rows, plan.views])

    result = trainer.fit()
    assert [r.epoch for r in result.history] == [1, 2]
    assert all(np.isnan(r.taught) for r in result.history)
    best = max(result.history, key=lambda r: r.val_top1["tiny"])
    loaded = load_model(ModelSpec("test_vit", result.checkpoints["tiny"], "tiny"))
    assert loaded.data_config["input_size"] == [3, 32, 32]
    payload = torch.load(result.checkpoints["tiny"], weights_only=True)
    assert payload["extra"]["epoch"] == best.epoch  # selected on val, never on test
    # The report's "before" is the saved random init; the numbers are the JSON's.
    assert (cfg.out_dir / "tiny.init.pt").is_file()
    report = json.loads((cfg.out_dir / "report.json").read_text())
    assert report["models"][0]["top1_after"] == pytest.approx(best.val_top1["tiny"])
    assert (cfg.out_dir / "report.png").stat().st_size > 10_000


def test_train_all_makes_every_member_a_student(pool, tmp_path):
    cfg = config(pool, tmp_path, student=None, mode="fixed", val_data=pool.val, report=True)
    result = train_all(cfg)
    assert sorted(result.runs) == ["a", "b"]
    names = [m.name for m in result.report.models]
    assert names == ["a", "b"]
    assert set(result.report.models[0].positive_flips) == {"b"}
    assert (cfg.out_dir / "a" / "a.pt").is_file() and (cfg.out_dir / "report.png").is_file()


def test_mismatched_stores_and_models_are_refused(pool, tmp_path):
    other_data = pool.root / "digits" / "val" / "subset.txt"
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        Trainer(config(pool, tmp_path, data=other_data))
    with pytest.raises(ValueError, match="'fixed' needs the student's initial outputs"):
        Trainer(config(pool, tmp_path, mode="fixed"))
    with pytest.raises(CheckpointError, match="holds a 'test_vit' model, not 'test_resnet'"):
        Trainer(config(pool, tmp_path, student=f"s:test_resnet={pool.root / 's.pt'}"))
    # A pool checkpoint other than the one the store was made from.
    with pytest.raises(StoreMismatchError, match=r"models\[a\].checkpoint_sha256"):
        Trainer(config(pool, tmp_path, models=(f"a:test_vit={pool.root / 's.pt'}",)))
    # The student calls itself a pool member but has other weights.
    with pytest.raises(StoreMismatchError, match="another model than the student"):
        Trainer(config(pool, tmp_path, student=f"a:test_vit={pool.root / 's.pt'}", models=()))
    with pytest.warns(ViewsRepeatWarning, match="3 epochs over 2 view"):
        Trainer(config(pool, tmp_path, epochs=3))


class _NaNRow(torch.nn.Module):
    """The wrapped model's logits with one row set to NaN."""

    def __init__(self, model: torch.nn.Module, row: int) -> None:
        super().__init__()
        self.model, self.row = model, row

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).index_fill(0, torch.tensor([self.row]), float("nan"))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN inside the kernel
def test_non_finite_logits_stop_with_the_step_and_samples_named(pool, tmp_path):
    cfg = config(pool, tmp_path)
    train(cfg)
    state = (cfg.out_dir / "state.pt").read_bytes()
    trainer = Trainer(dataclasses.replace(cfg, epochs=2, resume=True))
    trainer.learners[0].forward = _NaNRow(trainer.learners[0].model, row=3)
    culprit = trainer.dataset.keys[trainer.plan(1).samples[3]]
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    message = str(error.value)
    assert f"step 4 (epoch 2): NaN/inf logits of 's' on samples ['{culprit}']" in message
    assert "state.pt is kept" in message
    assert (cfg.out_dir / "state.pt").read_bytes() == state  # the last checkpoint is untouched


def test_cli_train_and_eval(pool, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--mode", "fixed", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2  # bad input: one exit code for every command (USER_ERROR_EXIT)
    assert "'fixed' needs the student's initial outputs" in result.output

    ok = [*args[:-4], "--epochs", "1", "--batch-size", "25", "--lr", "1e-3", "--out", str(out)]
    ok += ["--backend", "torch", "--workers", "0", "--val-data", str(pool.val)]
    result = runner.invoke(app, ok)
    assert result.exit_code == 0, result.output
    trained = out / "s.pt"
    result = runner.invoke(
        app,
        [
            *("eval", "--data", str(pool.val), "--model", f"s:test_vit={trained}"),
            *("--before", pool.specs["s"], "--before", pool.specs["a"]),
            *("--backend", "torch", "--out", str(tmp_path / "eval")),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())  # --out is a folder
    assert (tmp_path / "eval" / "report.png").is_file()
    assert [m["name"] for m in report["models"]] == ["s"]
    assert set(report["models"][0]["positive_flips"]) == {"a"}


def test_cli_view_augmentation_without_a_store_and_refused_with_one(pool, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ce"
    args = ["train", "--data", str(pool.train), "--student", pool.specs["s"]]
    args += ["--teachers", "none", "--views", "2", "--epochs", "1", "--batch-size", "25"]
    args += ["--backend", "torch", "--workers", "0", "--out", str(out), "--no-progress"]
    augment = ["--crop-scale", "0.6", "1", "--hflip", "0", "--eval-crop-pct", "1"]
    result = runner.invoke(app, [*args, *augment])
    assert result.exit_code == 0, result.output
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["config"]["augment"] == {
        "scale": [0.6, 1.0],
        "ratio": [3 / 4, 4 / 3],
        "hflip": 0.0,
        "eval_view": True,
        "eval_crop_pct": 1.0,
    }
    with_store = [*args, "--store", str(pool.store), "--hflip", "0"]
    result = runner.invoke(app, with_store, env={"COLUMNS": "400"})
    assert result.exit_code == 2
    assert "the views of a store are the ones it was dumped with" in result.output


def test_the_same_transfer_twice_gives_identical_weights(pool, tmp_path):
    """Two processes, the same command and seed: bit-identical weights. Through the CLI, with
    the DALI pipeline where installed (the demo's), the target prefetch thread and a live
    partition, each in a fresh interpreter (its own thread pools and seeds: what a rerun sees)."""
    import subprocess
    import sys

    weights = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        command = [
            *(sys.executable, "-m", "fastkd.cli.main", "train", "--data", str(pool.train)),
            *("--store", str(pool.store), "--student", pool.specs["s"], "--mode", "live"),
            *("--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--seed", "3"),
            *("--out", str(out), "--no-progress"),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        weights.append(torch.load(out / "s.pt", weights_only=True)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][key]), key
    initial = torch.load(pool.specs["s"].split("=", 1)[1], weights_only=True)["state_dict"]
    changed = any(not torch.equal(t, initial[k]) for k, t in weights[0].items())
    assert changed  # the runs trained: identical because deterministic, not because idle


def test_a_config_saved_before_best_and_partition_score_still_loads_and_resumes(pool, tmp_path):
    """Mode "all" is read as "best"; a state saved before partition_score compared log p(y)."""
    from fastkd.training.state import current_spelling

    assert config(pool, tmp_path, mode="all").loss.mode.value == "best"
    saved = {"mode": "all", "lr": 1e-3}  # the loss's settings were the config's own fields
    assert current_spelling(saved) == {
        "loss": {**LossSettings().to_dict(), "mode": "best", "partition_score": "label"},
        "lr": 1e-3,
        "control": False,  # and before --control, no control
        "model_lr": {},  # and before --lr NAME=VALUE, one lr for all
        "preset": None,  # and before the preset was recorded, none
        "preset_not_applied": [],
    }
    # a run without --joint never read stop_grad (--preset bi-kd saved it False there)
    unread = current_spelling({"joint": False, "loss": {"stop_grad": False}})
    assert unread["loss"]["stop_grad"] is True
    joint = current_spelling({"joint": True, "loss": {"stop_grad": False}})
    assert joint["loss"]["stop_grad"] is False


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", float("inf"), "--temperature must be positive and finite"),
        ("kd_weight", float("nan"), "--kd-weight must be finite and >= 0"),
        ("kd_weight", -1.0, "--kd-weight must be finite and >= 0"),
        ("ce_weight", float("inf"), "--ce-weight must be finite and >= 0"),
        ("lr", float("inf"), "--lr must be finite"),
    ],
)
def test_hyper_parameters_are_checked_before_training(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        if field in LOSS_FIELDS:  # checked where they live, in the loss's settings
            TrainConfig(data=tmp_path, teachers="none", loss=LossSettings(**{field: value}))
        else:
            TrainConfig(data=tmp_path, teachers="none", **{field: value})


def test_cli_refuses_a_negative_kd_weight_naming_it(pool, tmp_path):
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--kd-weight", "-1", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "--kd-weight must be finite and >= 0, got -1.0" in result.output


def test_a_run_sweeps_the_temp_files_a_killed_save_left_and_writes_with_the_umask(pool, tmp_path):
    out = tmp_path / "run"
    claim_output_folder(out, "train")  # the killed run had claimed its folder
    stale = [out / ".state.pt.k1ll3d.tmp", out / ".s.pt.x7y8.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = out / ".notes.txt.tmp"  # not a temp file of this run's files
    keep.write_text("mine")
    old = os.umask(0o027)
    try:
        result = train(config(pool, tmp_path, out_dir=out))
    finally:
        os.umask(old)
    assert not any(path.exists() for path in stale) and keep.exists()
    assert (result.checkpoints["s"].stat().st_mode & 0o777) == 0o640  # 0666 less the umask


def test_cli_train_refuses_a_damaged_store_naming_the_file(pool, tmp_path):
    """The issue's case: a teacher's shard deleted from a done block used to train on zeros
    (rc 0); the reader's block hash check now stops the run with one line naming the file."""
    import shutil

    import zarr

    from fastkd.store.integrity import shard_file

    store = tmp_path / "damaged.zarr"
    shutil.copytree(pool.store, store)
    group = zarr.open_group(store, mode="r")
    teacher = next(name for name in group["models"].group_keys() if name != "s")
    missing = Path(shard_file(store, group[f"models/{teacher}/true_logprob"], 0))
    missing.unlink()
    args = ["train", "--data", str(pool.train), "--store", str(store)]
    args += ["--student", pool.specs["s"], "--epochs", "1", "--batch-size", "25"]
    args += ["--backend", "torch", "--workers", "0", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert f"file {missing}: missing" in result.output and "--repair" in result.output
    assert "Traceback" not in result.output


def test_cli_train_names_an_image_replaced_by_one_of_the_same_size(pool, tmp_path):
    """The issue's case 2: the fingerprint (names, sizes) accepts a same-size replacement; the
    content hash the dump recorded for each file does not."""
    import shutil

    data = tmp_path / "train"  # the file list and its images, copied
    for line in pool.train.read_text().split("\n")[:-1]:
        key = line.split()[0]
        (data / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pool.train.parent / key, data / key)
    shutil.copy(pool.train, data / pool.train.name)
    victim = data / pool.train.read_text().split()[14]  # the 8th image's key
    victim.write_bytes(same_size_other_png(victim))
    args = ["train", "--data", str(data / pool.train.name), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--epochs", "1", "--batch-size", "25"]
    args += ["--backend", "torch", "--workers", "0", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "changed since the dump" in result.output and str(victim) in result.output


def test_cli_control_reports_the_difference_and_what_produced_it(pool, tmp_path):
    """--control trains the cross-entropy control beside the run; the report states its data
    (the --val-data that also selected the weights: optimistic), the settings, and each model's
    top-1 minus the control's with an interval, recomputed here from the saved predictions."""
    out = tmp_path / "run"
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--epochs", "1", "--batch-size", "25", "--lr", "1e-3"]
    args += ["--backend", "torch", "--workers", "0", "--val-data", str(pool.val)]
    args += ["--seed", "4", "--control", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert (out / "control" / "s.pt").is_file() and (out / "s.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    context = report["context"]
    assert context["data"] == str(pool.val) and context["data_selected_the_weights"] is True
    assert (context["teachers"], context["mode"], context["lr"]) == ("offline", "live", 1e-3)
    assert (context["epochs"], context["seed"]) == (1, 4)
    assert context["weight_change"]["s"] > 0
    control = report["control"]["s"]
    labels = np.array(report["labels"])
    top1 = 100 * np.mean(np.array(report["predictions_after"]["s"]) == labels)
    assert control["top1"] == pytest.approx(top1)
    from fastkd.statistics import paired_bootstrap

    control_right = np.array(report["predictions_control"]["s"]) == labels
    right = np.array(report["predictions_after"]["s"]) == labels
    interval = paired_bootstrap([right.astype(float) - control_right.astype(float)])
    assert control["control_top1"] == pytest.approx(100 * control_right.mean())
    assert (control["difference"], control["low"], control["high"]) == pytest.approx(
        (interval.estimate, interval.low, interval.high)
    )
    assert control["verdict"] == interval.verdict()
    assert report["context"]["weight_change"]["s"] > 0
    assert "optimistic" in result.output and "--test-data" in result.output
    assert "vs its cross-entropy control on the same images" in result.output


def test_a_report_on_held_out_data_is_not_called_optimistic_and_still_weights_are_named(
    pool, tmp_path
):
    out = tmp_path / "run"
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--epochs", "1", "--batch-size", "25", "--lr", "1e-12"]
    args += ["--backend", "torch", "--workers", "0", "--val-data", str(pool.val)]
    held_out = _subset(pool.root / "digits" / "test", 3)
    args += ["--test-data", str(held_out), "--out", str(out)]
    from fastkd.training.report import WeightsBarelyMovedWarning

    with pytest.warns(WeightsBarelyMovedWarning, match="s's weights moved by"):
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["context"]["data_selected_the_weights"] is False
    assert report["context"]["data"] == str(held_out)
    assert "optimistic" not in result.output
    same = [*args[:-4], "--test-data", str(pool.val), "--out", str(tmp_path / "same")]
    with pytest.warns(WeightsBarelyMovedWarning):
        result = CliRunner().invoke(app, same, env={"COLUMNS": "400"})
    assert "optimistic" in result.output  # the val data under another flag is still the val data
    assert "s's weights moved by" in result.output and "--control" in result.output


def test_weight_change_is_the_relative_l2_change_without_running_statistics(tmp_path):
    from fastkd.training.report import weight_change

    before = {"w": torch.tensor([3.0, 4.0]), "bn.running_mean": torch.tensor([1.0])}
    after = {"w": torch.tensor([3.0, 4.5]), "bn.running_mean": torch.tensor([9.0])}
    torch.save({"state_dict": before}, tmp_path / "a.pt")
    torch.save({"state_dict": after}, tmp_path / "b.pt")
    assert weight_change(tmp_path / "a.pt", tmp_path / "b.pt") == pytest.approx(0.5 / 5.0)


def test_control_needs_report_data_and_old_runs_resume(pool, tmp_path):
    """--control without --val-data/--test-data would train the control for nothing; a run
    state saved before --control existed still resumes (the field defaults to off)."""
    from fastkd.training.state import current_spelling

    with pytest.raises(ConfigError, match="--control compares the run"):
        config(pool, tmp_path, control=True)
    saved = config(pool, tmp_path).to_dict()
    del saved["control"]
    assert current_spelling(saved)["control"] is False
