"""`fastkd demo --quick` end to end, checked against independent references.

One quick demo (fold 0 of 5) runs for the module. Its saved predictions are checked against a
plain evaluation of the saved checkpoints (timm + PIL + numpy, none of fastkd's loaders), and its
summary against numpy on those predictions; the report's analysis is also held to hand-made
predictions where every number is known.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fastkd.demo import (
    ARMS,
    ARMS_BY_NAME,
    QUESTIONS,
    DemoConfig,
    DemoLayout,
    DemoReport,
    FoldPredictions,
    recompute_report,
    run_demo,
)
from fastkd.digits import DIGITS_POOL, digits_labels, fold_indices

ARM_NAMES = [arm.name for arm in ARMS]
MEMBERS = [member.name for member in DIGITS_POOL]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, with the KD loss's torch reference: under the Triton interpreter the
    kernels take ~1 s a step (their own tests hold them to that reference)."""
    out = tmp_path_factory.mktemp("demo")
    console = Console(file=io.StringIO(), width=160)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        report = run_demo(DemoConfig.quick(out_dir=out, progress=False), console)
    saved = json.loads((out / "report.json").read_text())
    return out, report, saved, console.file.getvalue()


def _predictions(out: Path, pattern: str) -> FoldPredictions:
    (path,) = sorted(out.glob(pattern))
    return FoldPredictions.from_dict(json.loads(path.read_text()))


def _predict(checkpoint: Path, files: list[Path]) -> np.ndarray:
    """Top-1 on the whole image (the pool's data configs: 16 px input, crop_pct 1)."""
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files])
    images = torch.from_numpy(pixels / 255.0).permute(0, 3, 1, 2)
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = payload["data_config"]
    assert tuple(config["input_size"]) == (3, *images.shape[-2:])
    assert config["crop_pct"] == 1.0
    model = timm.create_model(payload["arch"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    mean = torch.tensor(config["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(((images - mean) / std).float()).argmax(dim=1).numpy()


def test_every_fold_image_is_tested_once():
    labels = digits_labels()
    folds = fold_indices(labels, 5)
    joined = np.concatenate(folds)
    assert np.array_equal(np.sort(joined), np.arange(labels.size))
    for fold in folds:  # stratified: each class within one image of its share
        counts = np.bincount(labels[fold], minlength=10)
        assert np.all(np.abs(counts - np.bincount(labels, minlength=10) / 5) <= 1)


def test_report_files_hold_every_arm_member_and_question(demo):
    out, _, saved, printed = demo
    summary = saved["summary"]
    assert list(summary["arms"]) == ARM_NAMES
    assert summary["folds"] == [0] and summary["images"] == len(fold_indices(digits_labels(), 5)[0])
    for arm in ARM_NAMES:
        assert list(summary["arms"][arm]["members"]) == MEMBERS
    assert [(q["arm"], q["control"]) for q in summary["questions"]] == [
        (q.arm, q.control) for q in QUESTIONS
    ]
    with Image.open(out / "report.png") as plot:
        assert plot.format == "PNG" and plot.width > 1000
    table = (out / "report.txt").read_text()
    for text in ["plain KD", "joint Bi-KD", "rate (Roth)", "Primary:", "Secondary:", "Third:",
                 "KL+DP (Roth)", "knowledge loss"]:  # fmt: skip
        assert text in table and text in printed
    assert saved["numerics"]["cpu_capability"]


def test_the_report_records_its_code_and_every_prediction(demo):
    from fastkd.demo.config import code_version

    out, _, saved, _ = demo
    made = saved["provenance"]
    assert made["code_version"] == code_version()
    assert made["git"] is None or len(made["git"]["commit"]) == 40
    assert {"fastkd", "python", "torch", "timm", "numpy"} <= set(made["versions"])
    found = saved["predictions"]
    assert list(found["after"]) == ARM_NAMES
    # the predictions in the report are the very files each run wrote
    assert found["before"]["0"] == _predictions(out, "pool/*/test-predictions.json").to_dict()
    for arm in ARM_NAMES:
        run = _predictions(out, f"transfer/*/seed-0/{arm}/test-predictions.json")
        assert found["after"][arm]["0"]["0"] == run.to_dict()


def test_report_from_recomputes_every_number_without_training(demo, tmp_path):
    from fastkd.cli.main import app

    out, _, saved, _ = demo
    result = CliRunner().invoke(
        app, ["demo", "--report-from", str(out / "report.json"), "--out", str(tmp_path)],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "every number equals the saved report's" in " ".join(result.output.split())
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["summary"] == saved["summary"]
    assert not list(tmp_path.rglob("*.pt"))  # nothing trained
    # a report whose predictions were altered recomputes to other numbers, and says so
    altered = json.loads((out / "report.json").read_text())
    first = altered["predictions"]["after"]["bikd"]["0"]["0"]["predictions"]["resnet"]
    labels = altered["predictions"]["after"]["bikd"]["0"]["0"]["labels"]
    first[:] = labels  # resnet now right on every test image
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    report, same = recompute_report(tmp_path / "altered.json", console=Console(file=io.StringIO()))
    assert not same
    assert report.summary["arms"]["bikd"]["members"]["resnet"]["top1_after"] == 100.0
    differs = CliRunner().invoke(
        app, ["demo", "--report-from", str(tmp_path / "altered.json")], terminal_width=200
    )
    assert differs.exit_code == 1, differs.output
    assert "some numbers differ" in " ".join(differs.output.split())
    # the saved report is never written over
    before = (out / "report.json").read_bytes()
    refused = CliRunner().invoke(
        app, ["demo", "--report-from", str(out / "report.json"), "--out", str(out)],
        terminal_width=200,
    )  # fmt: skip
    assert refused.exit_code != 0
    assert "holds the report being recomputed" in " ".join(refused.output.split())
    assert (out / "report.json").read_bytes() == before


def test_the_papers_arms_run_their_own_settings(tmp_path):
    """Roth et al.'s arms: KL only, T = 1, SGD (momentum 0.9, weight decay 1e-4) at the demo's
    base lr per 256 images; joint Bi-KD: no stop-gradient, as the Bi-KD code's one backward."""
    from fastkd.demo.config import ROTH_BASE_LR
    from fastkd.demo.run import _transfer_config
    from fastkd.presets import KL_DP

    cfg = DemoConfig.quick(out_dir=tmp_path)
    layout = DemoLayout.of(cfg, 0)
    specs = ["a:resnet10t=a.pt", "b:resnet10t=b.pt"]  # joint needs two models to build
    for name in ("kl", "kl_dp_roth"):
        train = _transfer_config(cfg, layout, specs, ARMS_BY_NAME[name], 0)
        assert (train.loss.ce_weight, train.loss.kd_weight, train.loss.temperature) == (0, 1, 1)
        assert (train.optimizer, train.momentum, train.weight_decay) == ("sgd", 0.9, 1e-4)
        assert train.learning_rate == pytest.approx(ROTH_BASE_LR * cfg.batch_size / 256)
        assert "--ce-weight 0.0" in ARMS_BY_NAME[name].flags(cfg.transfer_lr, cfg.batch_size)
        # the kl-dp preset's recipe, but its lr (scaled to these models) and epochs (the demo's)
        recipe = {k: v.value for k, v in KL_DP.settings.items() if k not in ("lr", "epochs")}
        assert recipe.pop("mode") == "fixed" and recipe.pop("partition_score") == "label"
        assert recipe.pop("lr_schedule") == "constant" == train.lr_schedule
        assert recipe.pop("stop_grad") is True is train.loss.stop_grad
        for key, value in recipe.items():
            found = getattr(train.loss, key) if hasattr(train.loss, key) else getattr(train, key)
            assert found == value, key
    assert _transfer_config(cfg, layout, specs, ARMS_BY_NAME["kl"], 0).loss.mode.value == "plain"
    assert _transfer_config(cfg, layout, specs, ARMS_BY_NAME["kl_dp_roth"], 0).loss.mode.value == (
        "fixed"
    )
    joint = _transfer_config(cfg, layout, specs, ARMS_BY_NAME["joint"], 0)
    assert joint.joint and joint.loss.stop_grad is False
    assert "--no-stop-grad" in ARMS_BY_NAME["joint"].flags(cfg.transfer_lr, cfg.batch_size)
    others = [a for a in ARMS if a.name not in ("kl", "kl_dp_roth")]
    for arm in others:  # the Bi-KD-style arms: the demo's Adam lr, CE kept
        train = _transfer_config(cfg, layout, specs, arm, 0)
        assert train.optimizer == "adam" and train.learning_rate == cfg.transfer_lr
        assert train.loss.ce_weight == 1.0


def test_saved_predictions_match_a_plain_evaluation_of_the_checkpoints(demo):
    out, _, saved, _ = demo
    before = _predictions(out, "pool/*/test-predictions.json")
    test_list = DemoLayout.of(DemoConfig.quick(out_dir=out), 0).split("test")
    files = [test_list.parent / line.split()[0] for line in test_list.read_text().splitlines()]
    labels = np.array([int(f.parent.name) for f in files])
    assert before.labels == labels.tolist()
    for member in saved["pool"]["0"]:
        name = member["name"]
        assert before.predictions[name] == _predict(out / member["checkpoint"], files).tolist()
    after = _predictions(out, "transfer/*/seed-0/bikd/test-predictions.json")
    run = next((out / "transfer").glob("*/seed-0/bikd"))
    for name in MEMBERS:
        assert after.predictions[name] == _predict(run / name / f"{name}.pt", files).tolist()


def test_summary_is_computed_from_the_predictions(demo):
    out, _, saved, _ = demo
    summary = saved["summary"]
    before = _predictions(out, "pool/*/test-predictions.json")
    runs = {
        arm: _predictions(out, f"transfer/*/seed-0/{arm}/test-predictions.json")
        for arm in ARM_NAMES
    }
    for member in MEMBERS:
        was = before.correct(member)
        assert summary["top1_before"][member] == pytest.approx(100 * was.mean())
        for arm, found in runs.items():
            now = found.correct(member)
            figures = summary["arms"][arm]["members"][member]
            assert figures["delta"]["estimate"] == pytest.approx(100 * (now.mean() - was.mean()))
            assert figures["knowledge_gain"] == pytest.approx(100 * (~was & now).mean())
            assert figures["knowledge_loss"] == pytest.approx(100 * (was & ~now).mean())
    for question in summary["questions"]:
        arm, control = runs[question["arm"]], runs[question["control"]]
        difference = np.mean([arm.correct(m).mean() - control.correct(m).mean() for m in MEMBERS])
        interval = question["difference"]
        assert interval["estimate"] == pytest.approx(100 * difference)
        assert interval["low"] <= interval["estimate"] <= interval["high"]
        expected = ("better" if interval["low"] > 0 else "worse" if interval["high"] < 0
                    else "no difference detected")  # fmt: skip
        assert question["verdict"] == expected


def test_a_second_run_reuses_the_pool_store_and_runs(demo):
    out, report, _, _ = demo
    checkpoints = sorted((out / "pool").rglob("*.pt")) + sorted((out / "transfer").rglob("*.pt"))
    stamps = [path.stat().st_mtime_ns for path in checkpoints]
    again = run_demo(DemoConfig.quick(out_dir=out, progress=False), Console(file=io.StringIO()))
    assert [path.stat().st_mtime_ns for path in checkpoints] == stamps
    assert json.dumps(again.summary) == json.dumps(report.summary)  # NaN rates compare equal


# ----------------------------------------------------------------------------------------------
# The analysis on hand-made predictions


def _fold(fold: int, correct: dict[str, list[int]]) -> FoldPredictions:
    """Label 0 everywhere; ``correct[m][i]`` says whether member m is right on image i."""
    n = len(next(iter(correct.values())))
    return FoldPredictions(
        fold=fold,
        samples=list(range(fold * 100, fold * 100 + n)),
        labels=[0] * n,
        predictions={m: [0 if c else 1 for c in cs] for m, cs in correct.items()},
    )


def test_the_verdicts_follow_the_intervals_on_hand_made_predictions():
    pool = {0: [{"name": "a"}, {"name": "b"}], 1: [{"name": "a"}, {"name": "b"}]}
    before = {f: _fold(f, {"a": [0] * 40, "b": [1] * 20 + [0] * 20}) for f in (0, 1)}
    better = {f: {0: _fold(f, {"a": [1] * 30 + [0] * 10, "b": [1] * 40})} for f in (0, 1)}
    same = {f: {0: before[f]} for f in (0, 1)}
    arms = {"ce": same, "plain": same, "bikd": better}
    report = DemoReport.build(
        config={"folds": 5}, pool=pool, before=before, after=arms, resamples=500
    )
    questions = {q["control"]: q for q in report.summary["questions"]}
    # a: +30 of 40 images, b: +20 of 40, against unchanged controls: +62.5 points
    assert questions["plain"]["difference"]["estimate"] == pytest.approx(62.5)
    assert questions["plain"]["verdict"] == "better"
    assert report.summary["arms"]["plain"]["pool_delta"]["estimate"] == 0.0
    worse = DemoReport.build(
        config={"folds": 5}, pool=pool, before=before,
        after={"ce": better, "plain": better, "bikd": same}, resamples=500,
    )  # fmt: skip
    assert [q["verdict"] for q in worse.summary["questions"]] == ["worse", "worse"]
    assert worse.conclusion()[0].startswith("Primary: offline Bi-KD minus plain KD: -62.50")
    tied = DemoReport.build(config={"folds": 5}, pool=pool, before=before, after={"ce": same, "plain": same, "bikd": same}, resamples=100)  # fmt: skip
    assert all(q["verdict"] == "no difference detected" for q in tied.summary["questions"])


def test_members_and_seeds_share_their_images_in_the_bootstrap():
    """The rows of a fold (members, seeds) are resampled on the same images: opposite changes
    on the same image cancel (zero width); the same changes in separate folds would not."""
    pool = {0: [{"name": "a"}, {"name": "b"}]}
    before = {0: _fold(0, {"a": [0] * 20, "b": [0] * 20})}
    flip = [1] * 10 + [0] * 10
    zero = {0: {s: _fold(0, {"a": [0] * 20, "b": [0] * 20}) for s in (0, 1)}}
    # every image: one member right, the other wrong, on both seeds: 50 points on every image
    opposite = {0: {s: _fold(0, {"a": flip, "b": flip[::-1]}) for s in (0, 1)}}
    report = DemoReport.build(
        config={"folds": 5}, pool=pool, before=before,
        after={"ce": zero, "plain": zero, "bikd": opposite}, resamples=300,
    )  # fmt: skip
    paired = report.summary["questions"][0]["difference"]
    assert (paired["low"], paired["estimate"], paired["high"]) == (50.0, 50.0, 50.0)
    # a alone changes on half the images: the same mean of 50, now with a width
    alone = {0: {s: _fold(0, {"a": flip, "b": [0] * 20}) for s in (0, 1)}}
    half = DemoReport.build(
        config={"folds": 5}, pool=pool, before=before,
        after={"ce": zero, "plain": zero, "bikd": alone}, resamples=300,
    )  # fmt: skip
    spread = half.summary["questions"][0]["difference"]
    assert spread["estimate"] == 25.0 and spread["low"] < 25.0 < spread["high"]


def test_success_needs_a_change_beyond_the_control_arm():
    """Roth's rate counts every member that improved; the demo's counts a member only where its
    change beats its change under CE fine-tuning with the interval above zero, and does not
    score CE against itself."""
    pool = {0: [{"name": "a"}, {"name": "b"}]}
    before = {0: _fold(0, {"a": [0] * 60, "b": [0] * 60})}
    ce = {0: {0: _fold(0, {"a": [1] * 20 + [0] * 40, "b": [1] * 20 + [0] * 40})}}
    # a: right on 50 of 60 images (CE: 20), b: the same 20 as CE
    kd = {0: {0: _fold(0, {"a": [1] * 50 + [0] * 10, "b": [1] * 20 + [0] * 40})}}
    report = DemoReport.build(
        config={"folds": 5}, pool=pool, before=before, after={"ce": ce, "plain": kd},
        resamples=500,
    )  # fmt: skip
    arms = report.summary["arms"]
    assert arms["ce"]["success_rate"] is None and arms["ce"]["success_rate_roth"] == 100.0
    assert arms["plain"]["success_rate_roth"] == 100.0  # both improved on the pool before
    assert arms["plain"]["success_rate"] == 50.0  # only a beat CE
    a, b = arms["plain"]["members"]["a"], arms["plain"]["members"]["b"]
    assert a["vs_control"]["estimate"] == pytest.approx(50.0) and a["success"]
    assert b["vs_control"]["estimate"] == 0.0 and not b["success"]
    assert "vs_control" not in arms["ce"]["members"]["a"]


def test_questions_report_the_knowledge_each_arm_loses():
    """Knowledge loss: right before transfer, wrong after (% of test images per member)."""
    from fastkd.demo.config import Question

    pool = {0: [{"name": "a"}]}
    before = {0: _fold(0, {"a": [1] * 30 + [0] * 10})}
    # plain KL forgets 12 of a's 30 right images and learns 4; KL+DP forgets 2, learns 4
    kl = {0: {0: _fold(0, {"a": [0] * 12 + [1] * 18 + [1] * 4 + [0] * 6})}}
    kl_dp = {0: {0: _fold(0, {"a": [0] * 2 + [1] * 28 + [1] * 4 + [0] * 6})}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "fastkd.demo.analysis.QUESTIONS", (Question("kl_dp_roth", "kl", "third"),)
        )
        report = DemoReport.build(
            config={"folds": 5}, pool=pool, before=before,
            after={"kl": kl, "kl_dp_roth": kl_dp}, resamples=500,
        )  # fmt: skip
    (q,) = report.summary["questions"]
    assert q["difference"]["estimate"] == pytest.approx(100 * 10 / 40)
    lost = q["knowledge_loss"]
    assert (lost["arm"], lost["control"]) == pytest.approx((100 * 2 / 40, 100 * 12 / 40))
    assert lost["difference"]["estimate"] == pytest.approx(-25.0)
    assert lost["difference"]["high"] < 0
    assert "Knowledge lost: 5.00% vs 30.00%" in report.conclusion()[0]


def test_a_saved_report_recomputes_to_the_same_numbers(tmp_path):
    pool = {f: [{"name": "a"}, {"name": "b"}] for f in (0, 1)}
    before = {f: _fold(f, {"a": [0] * 30 + [1] * 10, "b": [1] * 20 + [0] * 20}) for f in (0, 1)}
    runs = {
        arm: {f: {s: _fold(f, {"a": [(i * (s + 3) + f + k) % 3 == 0 for i in range(40)],
                               "b": [(i + s + k) % 2 == 0 for i in range(40)]})
                  for s in (0, 1, 2)} for f in (0, 1)}
        for k, arm in enumerate(("ce", "plain", "bikd"))
    }  # fmt: skip
    report = DemoReport.build(
        config={"folds": 5, "resamples": 300}, pool=pool, before=before, after=runs,
        resamples=300, provenance={"code_version": "x"},
    )  # fmt: skip
    assert report.summary["seeds"] == [0, 1, 2]
    assert report.summary["questions"][0]["difference"]["seeds"] == 3  # seeds resampled
    saved = json.loads(json.dumps(report.to_dict()))
    again = DemoReport.recompute(saved)
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(saved["summary"], sort_keys=True)
    assert again.provenance == {"code_version": "x"}
    del saved["predictions"]
    with pytest.raises(ValueError, match="holds no predictions"):
        DemoReport.recompute(saved)


def test_config_refuses_bad_folds_and_epochs(tmp_path):
    with pytest.raises(ValueError, match="transfer_epochs"):
        DemoConfig(out_dir=tmp_path, views=2, transfer_epochs=3)
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(out_dir=tmp_path, seeds=(1, 1))
    with pytest.raises(ValueError, match="fold_ids"):
        DemoConfig(out_dir=tmp_path, fold_ids=(5,))


def test_cli_help_names_the_question_and_the_reuse():
    from fastkd.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("--quick", "--folds", "plain KD", "reused"):
        assert text in result.output
