"""Values that used to pass silently or end in a traceback: each is now a correct result or one
named `error:` line. Crop ratios and scales are finite with a non-empty box, the momentum below
1, the device one fastkd runs on; weights that explode or stop being finite end a run before they
are saved; a store dumped with ``--on-bad-image skip`` trains, without its skipped images."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_cli_messages import assert_one_line_error, invoke
from training_pool import config, make_pool

from fastkd.augment import AugmentConfig
from fastkd.data import Preprocess
from fastkd.dump import DumpConfig, run_dump
from fastkd.errors import USER_ERROR_EXIT, ConfigError, NonFiniteError
from fastkd.store import StoreReader
from fastkd.training import Trainer
from fastkd.training.steps import EXPLODED_NORM_RATIO, exploded_weights_error
from fastkd.views import view_boxes

BACKENDS = ["torch", "dali", "nvjpeg"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("pool"))


@pytest.mark.parametrize(
    "flag, values",
    [
        ("--crop-ratio", ["inf", "inf"]),
        ("--crop-ratio", ["1", "inf"]),
        ("--crop-ratio", ["nan", "1"]),
        ("--crop-ratio", ["0", "1"]),
        ("--crop-scale", ["0.5", "inf"]),
        ("--crop-scale", ["0", "1"]),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_ranges_must_be_finite_and_positive(pool, tmp_path, flag, values, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    args = ["dump", "--data", str(pool.train), "--model", pool.specs["a"], "--backend", backend]
    result = invoke([*args, flag, *values, "--out", str(tmp_path / "s.zarr")])
    # a usage error of the view options (click's, exit 2), before anything runs
    assert result.exit_code == USER_ERROR_EXIT and "Traceback" not in result.output
    assert f"Invalid value: crop {flag.removeprefix('--crop-')} ({flag}) must" in result.output
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(ConfigError, match=rf"\({flag}\) must"):
        AugmentConfig(**{flag.removeprefix("--crop-"): tuple(float(v) for v in values)})


@pytest.mark.parametrize("ratio", [(1e-300, 1e-300), (1e300, 1e300), (1e-9, 1e9)])
def test_extreme_finite_ratios_still_give_non_empty_boxes(ratio):
    sizes = np.array([[7, 5], [1, 1], [480, 640], [3, 900]])
    cfg = AugmentConfig(scale=(0.08, 1.0), ratio=ratio, eval_view=False)
    boxes, _ = view_boxes(0, np.arange(4), 6, sizes, cfg)
    top, left, height, width = np.moveaxis(boxes, -1, 0)
    assert (height >= 1).all() and (width >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= sizes[:, None, 0]).all() and (left + width <= sizes[:, None, 1]).all()


@pytest.mark.parametrize("momentum", [1.0, 2.0, -0.1, math.nan])
def test_momentum_is_below_one(pool, tmp_path, momentum):
    with pytest.raises(ConfigError, match=r"--momentum must be in \[0, 1\)"):
        config(pool, tmp_path, optimizer="sgd", momentum=momentum)
    config(pool, tmp_path, optimizer="sgd", momentum=0.99)


@pytest.mark.parametrize("device", ["banana", "cuda:x", "tpu", "cuda", "cuda:7"])
def test_a_device_fastkd_cannot_use_is_one_line(pool, tmp_path, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has an eighth GPU")
    args = ["train", "--data", str(pool.train), "--store", str(pool.store)]
    args += ["--student", pool.specs["s"], "--device", device, "--out", str(tmp_path / "r")]
    line = assert_one_line_error(invoke(args))
    assert line.startswith(f"error: --device {device}") or f"--device {device!r}" in line, line
    assert not (tmp_path / "r").exists()


class _Exploding(Trainer):
    """A run whose weights are multiplied by ``factor`` at the end of each epoch (a learning
    rate far too high does that through the optimiser)."""

    factor = 1.0

    def _run_epoch(self, progress, task):
        record = super()._run_epoch(progress, task)
        with torch.no_grad():
            for parameter in self.learners[0].model.parameters():
                parameter.mul_(self.factor)
        return record


@pytest.mark.parametrize(
    "factor, said", [(1e5, "exploded in epoch 1"), (math.inf, "are not finite after epoch 1")]
)
def test_exploding_weights_stop_the_run_before_they_are_saved(pool, tmp_path, factor, said):
    trainer = _Exploding(config(pool, tmp_path))
    trainer.factor = factor
    with pytest.raises(NonFiniteError, match=f"the weights of 's' {said}"):
        trainer.fit()
    assert not (tmp_path / "run" / "s.pt").exists() and not (tmp_path / "run" / "state.pt").exists()


def test_the_explosion_threshold_is_relative_to_the_weights_before_training(tmp_path):
    state = tmp_path / "state.pt"
    assert exploded_weights_error("m", 10.0 * EXPLODED_NORM_RATIO, 10.0, 1, state) is None
    assert exploded_weights_error("m", 0.5 * EXPLODED_NORM_RATIO, 0.0, 1, state) is None
    assert exploded_weights_error("m", 11.0 * EXPLODED_NORM_RATIO, 10.0, 1, state) is not None
    assert exploded_weights_error("m", math.nan, 10.0, 1, state) is not None


def _folder_with_a_broken_image(pool: SimpleNamespace, root: Path) -> tuple[Path, str]:
    """Two digits of each class from the pool's folder, and one class-3 file that is no image."""
    folder = root / "data"
    source = pool.train.parent
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        for png in sorted((source / str(label)).glob("*.png"))[:2]:
            shutil.copy(png, folder / str(label) / png.name)
    (folder / "3" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder, "3/zz-broken.png"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_dumped_with_skipped_images_trains_without_them(pool, tmp_path, backend, caplog):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data, broken = _folder_with_a_broken_image(pool, tmp_path)
    store = run_dump(
        DumpConfig(
            data=data,
            models=[pool.specs["a"], pool.specs["b"]],
            out=tmp_path / "store.zarr",
            views=2,
            backend=backend,
            num_workers=0,
            on_bad_image="skip",
            progress=False,
        )
    )
    reader = StoreReader(store)
    skipped = [reader.keys[s] for s in np.flatnonzero(reader.skipped)]
    assert skipped == [broken]
    cfg = config(pool, tmp_path, data=data, store=store, backend=backend, batch_size=8)
    trainer = Trainer(cfg)
    planned = np.concatenate([trainer.plan(e).samples for e in range(2)])
    assert reader.keys.index(broken) not in planned and len(planned) == 2 * 20
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        result = trainer.fit()
    assert result.skipped == 1 and (tmp_path / "run" / "s.pt").is_file()
    assert "1 of 21 samples are left out of training: the dump skipped them" in caplog.text


def test_a_data_config_beyond_any_input_or_without_its_statistics_is_refused():
    """A checkpoint's or store's data config sizes every batch: refused, not allocated."""
    config = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_data_config(config).height == 224
    with pytest.raises(ConfigError, match=r"input_size \[3, 1000000, 224\]: each side in 1\.\."):
        Preprocess.from_data_config({**config, "input_size": [3, 10**6, 224]})
    with pytest.raises(ConfigError, match=r"has no mean"):
        Preprocess.from_data_config({k: v for k, v in config.items() if k != "mean"})


def test_the_cli_says_how_many_samples_a_skipping_dump_left_out(pool, tmp_path):
    data, _ = _folder_with_a_broken_image(pool, tmp_path)
    models = ["--model", pool.specs["a"], "--model", pool.specs["b"]]
    store = str(tmp_path / "store.zarr")
    common = ["--data", str(data), "--backend", "torch", "--workers", "0", "--no-progress"]
    dumped = invoke(
        ["dump", *common, *models, "--views", "1", "--out", store, "--on-bad-image", "skip"]
    )
    assert dumped.exit_code == 0, dumped.output
    args = ["train", *common, "--store", store, "--student", pool.specs["s"], *models]
    trained = invoke([*args, "--epochs", "1", "--lr", "1e-3", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert "1 sample(s) left out of training: the dump skipped them" in trained.stdout
