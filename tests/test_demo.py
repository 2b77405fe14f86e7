"""`fastkd demo --quick` end to end, checked against independent references.

One quick demo runs for the module (about a minute on two CPU cores). Its report is checked
against a plain re-evaluation of the saved checkpoints (timm + PIL + numpy, none of fastkd's
loaders or metrics), against numpy's mean / std over the per-seed runs, and against the rule
that turns paired differences into a verdict. The verdict logic is also held to hand-made cases.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fastkd.demo import ARMS, Comparison, DemoConfig, DemoReport, run_demo
from fastkd.digits import DIGITS_POOL
from fastkd.metrics import transfer_report

ARM_NAMES = [arm.name for arm in ARMS]
MEMBERS = [member.name for member in DIGITS_POOL]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The quick demo, with the KD loss's torch reference: under the Triton interpreter the
    kernels take ~1 s a step (their own tests hold them to that reference)."""
    out = tmp_path_factory.mktemp("demo")
    console = Console(file=io.StringIO(), width=140)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        report = run_demo(DemoConfig.quick(out_dir=out, progress=False), console)
    saved = json.loads((out / "report.json").read_text())
    return out, report, saved, console.file.getvalue()


# ----------------------------------------------------------------------------------------------
# An independent evaluation of a checkpoint: timm, PIL and numpy only.


def _test_images(root: Path) -> tuple[torch.Tensor, np.ndarray]:
    files = sorted(root.glob("*/*.png"))
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files])
    labels = np.array([int(f.parent.name) for f in files])
    return torch.from_numpy(pixels / 255.0).permute(0, 3, 1, 2), labels


def _predict(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    """Top-1 on the whole 32 px image (the pool's data configs: 32 px input, crop_pct 1)."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = payload["data_config"]
    assert tuple(config["input_size"]) == (3, *images.shape[-2:])
    assert config["crop_pct"] == 1.0
    model = timm.create_model(payload["arch"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    mean = torch.tensor(config["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.eval()(((images - mean) / std).float())
    return logits.argmax(dim=1).numpy()


# ----------------------------------------------------------------------------------------------
# The quick demo's output


def test_report_files_hold_every_arm_seed_and_member(demo):
    out, report, saved, printed = demo
    assert list(saved["runs"]) == ARM_NAMES
    for arm in ARM_NAMES:
        assert sorted(int(seed) for seed in saved["runs"][arm]) == SEEDS
        for run in saved["runs"][arm].values():
            assert [m["name"] for m in run["models"]] == MEMBERS
            assert (out / run["dir"] / "report.json").is_file()  # train_all's own report
            assert run["num_samples"] == saved["num_test_samples"]
    assert saved["num_test_samples"] == len(list((out / saved["test_data"]).glob("*/*.png")))
    assert [p["name"] for p in saved["pool"]] == MEMBERS
    assert len({p["arch"] for p in saved["pool"]}) == 3
    assert (out / saved["store"] / "zarr.json").is_file()
    with Image.open(out / "report.png") as plot:
        assert plot.format == "PNG" and plot.width > 800
    table = (out / "report.txt").read_text()
    for text in ["top-1 before", "pool mean", *ARM_NAMES, *MEMBERS, "Verdict:"]:
        assert text in table
    assert "Verdict:" in printed
    assert saved["conclusion"] == report.conclusion()


def test_reported_accuracies_match_a_plain_evaluation_of_the_checkpoints(demo):
    out, _, saved, _ = demo
    images, labels = _test_images(out / saved["test_data"])
    before = {p["name"]: _predict(out / p["checkpoint"], images) for p in saved["pool"]}
    for arm, seed in [("live", "0"), ("ce", "2")]:
        run = saved["runs"][arm][seed]
        for model in run["models"]:
            name = model["name"]
            after = _predict(out / run["dir"] / name / f"{name}.pt", images)
            was, now = before[name] == labels, after == labels
            assert model["top1_before"] == pytest.approx(100 * was.mean(), abs=1e-9)
            assert model["top1_after"] == pytest.approx(100 * now.mean(), abs=1e-9)
            assert model["knowledge_gain"] == pytest.approx(100 * (~was & now).mean(), abs=1e-9)
            assert model["knowledge_loss"] == pytest.approx(100 * (was & ~now).mean(), abs=1e-9)
            for other in MEMBERS:
                if other != name:
                    flips = (before[other] == labels) & ~was
                    assert model["positive_flips"][other] == pytest.approx(100 * flips.mean())


def test_summary_is_mean_and_spread_over_seeds(demo):
    _, _, saved, _ = demo
    for arm in ARM_NAMES:
        runs = [saved["runs"][arm][str(seed)] for seed in SEEDS]
        summary = saved["summary"][arm]
        for i, member in enumerate(MEMBERS):
            deltas = [run["models"][i]["delta"] for run in runs]
            assert all(run["models"][i]["name"] == member for run in runs)
            stat = summary["members"][member]["delta"]
            assert stat["mean"] == pytest.approx(np.mean(deltas))
            assert stat["std"] == pytest.approx(np.std(deltas, ddof=1))
        pool = [np.mean([m["delta"] for m in run["models"]]) for run in runs]
        assert summary["pool_delta"]["mean"] == pytest.approx(np.mean(pool))
        assert summary["pool_delta"]["std"] == pytest.approx(np.std(pool, ddof=1))
        improved = [100 * np.mean([m["delta"] > 0 for m in run["models"]]) for run in runs]
        assert summary["success_rate"]["mean"] == pytest.approx(np.mean(improved))


def test_comparisons_pair_arms_by_seed_and_member(demo):
    _, _, saved, _ = demo
    compared = {(c["arm"], c["control"]): c for c in saved["comparisons"]}
    assert set(compared) == {(a, c) for a in ("live", "fixed") for c in ("all", "ce")}
    for (arm, control), c in compared.items():
        differences = [
            a["top1_after"] - b["top1_after"]
            for seed in SEEDS
            for a, b in zip(
                saved["runs"][arm][str(seed)]["models"],
                saved["runs"][control][str(seed)]["models"],
                strict=True,
            )
        ]
        assert c["pairs"] == len(SEEDS) * len(MEMBERS)
        assert c["mean"] == pytest.approx(np.mean(differences))
        assert c["sem"] == pytest.approx(np.std(differences, ddof=1) / math.sqrt(c["pairs"]))
    helps = any(c["verdict"] == "better" for (_, ctl), c in compared.items() if ctl == "ce")
    verdict = saved["conclusion"][-1]
    assert verdict.startswith("Verdict: transfer helps" if helps else "Verdict: transfer does not")


def test_a_second_run_reuses_the_pool_store_and_runs(demo):
    out, report, _, _ = demo
    checkpoints = sorted((out / "pool").rglob("*.pt")) + sorted((out / "transfer").rglob("*.pt"))
    stamps = [path.stat().st_mtime_ns for path in checkpoints]
    start = time.perf_counter()
    again = run_demo(DemoConfig.quick(out_dir=out, progress=False), Console(file=io.StringIO()))
    assert time.perf_counter() - start < 30.0  # nothing trained: a full quick run takes minutes
    assert [path.stat().st_mtime_ns for path in checkpoints] == stamps
    assert again.summary() == report.summary()


# ----------------------------------------------------------------------------------------------
# The verdict and the configuration, on hand-made cases


def test_comparison_verdicts_on_hand_computed_cases():
    c = Comparison.of("live", "ce", [1.0, 2.0, 3.0])  # mean 2, std 1, s.e. 1/sqrt(3)
    assert (c.mean, c.std, c.pairs) == (2.0, 1.0, 3)
    assert c.sem == pytest.approx(1 / math.sqrt(3))
    assert c.verdict == "better"  # 2 - 2 * 0.577 > 0
    assert Comparison.of("live", "ce", [1.0, -1.0, 1.0, -1.0]).verdict == "no clear difference"
    assert Comparison.of("live", "ce", [-0.5, -0.5, -0.5]).verdict == "worse"  # std 0
    assert Comparison.of("live", "ce", [0.0, 0.0]).verdict == "no clear difference"
    assert Comparison.of("live", "ce", [3.0]).verdict == "too few pairs to tell"


def _report(after: dict[str, dict[str, list[int]]]) -> DemoReport:
    """Members a and b, two seeds with the same outcome, 4 samples of label 0:
    ``after[arm][member]`` says which samples the member gets right after training."""
    labels = np.zeros(4, dtype=np.int64)

    def predictions(correct: list[int]) -> np.ndarray:
        return np.where(np.asarray(correct, dtype=bool), 0, 1)

    before = {"a": predictions([1, 1, 0, 0]), "b": predictions([1, 0, 1, 0])}
    runs = {
        arm: {
            seed: transfer_report(labels, before, {m: predictions(c) for m, c in members.items()})
            for seed in (0, 1)
        }
        for arm, members in after.items()
    }
    dirs = {arm: {0: "", 1: ""} for arm in runs}
    return DemoReport({}, [{"name": "a"}, {"name": "b"}], "test", "store", runs, dirs)


UNCHANGED = {"a": [1, 1, 0, 0], "b": [1, 0, 1, 0]}
IMPROVED = {"a": [1, 1, 1, 0], "b": [1, 1, 1, 0]}  # +25 points each
DEGRADED = {"a": [1, 0, 0, 0], "b": [0, 0, 1, 0]}  # -25 points each


def test_the_verdict_is_computed_from_the_numbers():
    report = _report(dict.fromkeys(("live", "fixed", "all", "ce"), UNCHANGED))
    assert all(c.mean == 0.0 and c.verdict == "no clear difference" for c in report.comparisons())
    assert report.conclusion()[-1] == (
        "Verdict: transfer does not help on this data: no transfer arm beats cross-entropy "
        "fine-tuning for the same steps (no clear difference); against plain KD, the partition "
        "gives: live no clear difference, fixed no clear difference."
    )

    report = _report({"live": IMPROVED, "fixed": DEGRADED, "all": UNCHANGED, "ce": UNCHANGED})
    verdicts = {(c.arm, c.control): (c.mean, c.verdict) for c in report.comparisons()}
    assert verdicts[("live", "ce")] == (25.0, "better")
    assert verdicts[("fixed", "ce")] == (-25.0, "worse")
    assert report.summary()["live"]["pool_delta"] == {"mean": 25.0, "std": 0.0}
    assert report.conclusion()[-1].startswith("Verdict: transfer helps on this data: live beats")
    assert report.conclusion()[-1].endswith(
        "plain KD, the partition gives: live better, fixed worse."
    )

    report = _report({"live": DEGRADED, "fixed": UNCHANGED, "all": UNCHANGED, "ce": UNCHANGED})
    assert "(live did worse); against plain KD" in report.conclusion()[-1]


def test_config_refuses_more_transfer_epochs_than_views(tmp_path):
    with pytest.raises(ValueError, match="transfer_epochs"):
        DemoConfig(out_dir=tmp_path, views=2, transfer_epochs=3)
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(out_dir=tmp_path, seeds=(1, 1))


def test_cli_help_names_the_quick_run_and_the_reuse():
    from fastkd.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--quick" in result.output and "reused" in result.output
