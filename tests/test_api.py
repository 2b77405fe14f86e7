"""The public Python API (``import fastkd``) against independent references, and the example
loop (examples/own_loop.py) against ``fastkd train``'s loss curve with the same seed and settings.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference_views import reference_inputs
from training_pool import config, make_pool
from typer.testing import CliRunner

import fastkd
from fastkd.cli.main import app
from fastkd.data import view_loader
from fastkd.errors import ConfigError, StoreMismatchError
from fastkd.training import Trainer
from fastkd.views import pixel_box

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("api_pool"))


def test_import_is_light_and_every_public_name_resolves() -> None:
    code = (
        "import sys, fastkd\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'zarr', 'nvidia.dali') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    missing = [name for name in fastkd.__all__ if getattr(fastkd, name, None) is None]
    assert not missing, missing
    assert set(fastkd.__all__) == {"__version__", *fastkd._HOMES}
    assert set(fastkd.__all__) <= set(dir(fastkd))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fastkd.nope


def test_epoch_rows_are_the_rows_fastkd_train_plans(pool: SimpleNamespace, tmp_path: Path):
    store = fastkd.open_store(pool.store, pool.train)
    trainer = Trainer(config(pool, tmp_path, epochs=2))
    views_seen = np.zeros((store.num_samples, store.num_views), dtype=np.int64)
    for epoch in range(2 * store.num_views):
        samples, views = fastkd.epoch_rows(store, epoch, seed=0)
        plan = trainer.plan(epoch)
        np.testing.assert_array_equal(samples, plan.samples)
        np.testing.assert_array_equal(views, plan.views)
        assert sorted(samples.tolist()) == list(range(store.num_samples))  # nothing skipped
        np.add.at(views_seen, (samples, views), 1)
    # every stored view of every sample once per num_views epochs: twice in 2 x num_views
    assert (views_seen == 2).all()
    other, _ = fastkd.epoch_rows(store, 0, seed=1)
    assert not np.array_equal(other, fastkd.epoch_rows(store, 0, seed=0)[0])


def test_read_targets_are_the_stored_values(pool: SimpleNamespace) -> None:
    """Against the arrays read with plain zarr (docs/store-format.md), in the asked columns."""
    import zarr

    store = fastkd.open_store(pool.store)
    samples, views = np.array([5, 0, 46, 5]), np.array([1, 0, 1, 0])
    targets = fastkd.read_targets(store, samples, views, members=["b", "a"])
    assert isinstance(targets, fastkd.PoolTargets)
    group = zarr.open_group(pool.store, mode="r")
    for column, name in enumerate(["b", "a"]):
        stored = group[f"models/{name}"]
        logprobs = stored["logprobs"][:][samples, views]
        true_logprob = stored["true_logprob"][:][samples, views]
        np.testing.assert_array_equal(targets.logprobs[:, column].numpy(), logprobs)
        np.testing.assert_array_equal(targets.true_logprob[:, column].numpy(), true_logprob)
    # the label's log-probability is the dense row's, at the label (fp16 rounding apart)
    labels = group["labels"][:][samples]
    at_label = targets.logprobs[torch.arange(4), 0, torch.from_numpy(labels)].float()
    torch.testing.assert_close(targets.true_logprob[:, 0], at_label, atol=2e-3, rtol=2e-3)


def test_view_transform_rebuilds_the_stored_view(pool: SimpleNamespace) -> None:
    """Against torchvision's crop-resize-flip-normalise, and bit for bit what fastkd train's torch
    loader feeds the model."""
    store = fastkd.open_store(pool.store, pool.train)
    data = fastkd.open_dataset(pool.train)
    spec = pool.specs["b"]  # the ResNet member: 24 px, bilinear, ImageNet mean and std
    data_config = fastkd.load_model(spec).data_config
    transform = fastkd.ViewTransform(data_config)
    samples, views = np.array([3, 17, 30]), np.array([0, 1, 1])
    boxes, flips = store.view_params(samples, views)
    ours = torch.stack(
        [
            transform(data.path(s), box, flip)
            for s, box, flip in zip(samples, boxes, flips, strict=True)
        ]
    )
    reference = torch.stack(
        [
            reference_inputs(data.path(s), pixel_box(box, *data.sizes[s]), flip, data_config)
            for s, box, flip in zip(samples, boxes, flips, strict=True)
        ]
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    (batch,) = view_loader(
        data, samples, views, boxes, flips, [data_config], batch_size=3, backend="torch",
        num_workers=0,
    )  # fmt: skip
    assert torch.equal(ours, batch.images[0])
    from_bytes = transform(data.path(samples[0]).read_bytes(), boxes[0], flips[0])
    assert torch.equal(from_bytes, ours[0])
    with pytest.raises(ConfigError, match="path or bytes"):
        transform(np.zeros((3, 8, 8)), boxes[0], flips[0])


def test_open_store_refuses_other_data(pool: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        fastkd.open_store(pool.store, pool.val)
    # a file list's (or a shard's) label is not in the fingerprint: relabelled, it is refused
    lines = pool.train.read_text().splitlines()
    path, label = lines[4].rsplit(None, 1)
    lines[4] = f"{path} {(int(label) + 1) % 10}"
    relabelled = pool.train.parent / "relabelled.txt"
    relabelled.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreMismatchError, match=rf"labels: 1 sample.*first '{path}': store has"):
        fastkd.open_store(pool.store, relabelled)


def test_target_columns_by_hand() -> None:
    assert fastkd.target_columns(["a", "s", "b"], "s") == (["a", "b"], None)
    assert fastkd.target_columns(["a", "s", "b"], "s", "fixed") == (["a", "b", "s"], 2)
    assert fastkd.target_columns(["a", "b"], "s", "best") == (["a", "b"], None)
    with pytest.raises(ConfigError, match="no teacher besides the student"):
        fastkd.target_columns(["s"], "s")
    with pytest.raises(ConfigError, match="partition mode 'nope' is not one of live, fixed"):
        fastkd.target_columns(["a", "s"], "s", "nope")


def _epoch_losses(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"^epoch \d+ loss (\S+)$", text, flags=re.MULTILINE)]


def test_the_example_loop_follows_fastkd_train(
    pool: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """examples/own_loop.py and `fastkd train` with the same seed and settings: the same loss
    curve and the same trained weights, to float tolerance (fused vs for-each Adam, mean vs
    scaled-sum reduction). Both in-process, on the kernels' torch reference (the interpreter
    would only make it slower: both sides call the same loss)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    settings = ["--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--seed", "0"]
    common = ["--store", str(pool.store), "--data", str(pool.train), "--student", pool.specs["s"]]
    example = ROOT / "examples" / "own_loop.py"
    monkeypatch.setattr(
        sys, "argv", [str(example), *common, *settings, "--out", str(tmp_path / "own.pt")]
    )
    runpy.run_path(str(example), run_name="__main__")
    got = _epoch_losses(capsys.readouterr().out)
    theirs = CliRunner().invoke(
        app,
        [
            "train",
            *common,
            *settings,
            "--backend",
            "torch",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ],
        catch_exceptions=False,
    )
    assert theirs.exit_code == 0, theirs.output[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    expected = [record["loss"] for record in history]
    assert len(got) == len(expected) == 2
    assert expected[0] != expected[1]  # the curve moves: the comparison is not of constants
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Adam magnifies float differences in tiny gradients into steps of about the lr: the
    # weights agree to a small share of how far training moved them, not to rounding.
    trained = torch.load(tmp_path / "run" / "s.pt", weights_only=True)["state_dict"]
    initial = torch.load(pool.root / "s.pt", weights_only=True)["state_dict"]
    own = torch.load(tmp_path / "own.pt", weights_only=True)
    assert trained.keys() == own.keys()
    for name, value in trained.items():
        moved = (value - initial[name]).double().norm()
        apart = (own[name] - value).double().norm()
        assert apart <= 1e-2 * moved, f"{name}: {apart:.3g} apart, moved {moved:.3g}"
