"""The benchmarks' workloads: photo-like JPEGs, random-init pools, steady-state rates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, JpegImagePlugin

from fastkd.bench import dump as bench_dump
from fastkd.bench import train as bench_train
from fastkd.bench.photos import IMAGENET_SHAPES, QUALITY, describe, label_list, write_photos
from fastkd.bench.pool import CPU_POOL, GPU_POOL, model_specs, parse_pool
from fastkd.data import open_dataset
from fastkd.errors import ConfigError
from fastkd.models import ModelSpec, load_model


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"), 12, classes=3, seed=5)


def test_photos_are_imagenet_like_jpegs_made_from_the_sample_photographs(photos: Path) -> None:
    files = sorted(photos.rglob("*.jpg"), key=lambda f: f.name)
    assert [f.parent.name for f in files] == [f"class{i % 3}" for i in range(12)]
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert (image.height, image.width) in IMAGENET_SHAPES
            assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0 chroma
            assert "progressive" not in image.info
            pixels = np.asarray(image, dtype=np.float64)
        # a photograph's detail, not a flat field: neighbouring pixels differ by several levels
        assert np.abs(np.diff(pixels, axis=1)).mean() > 4
    sizes = [f.stat().st_size / 1e3 for f in files]
    assert 50 < np.mean(sizes) < 150 and min(sizes) > 30
    described = describe(photos)
    assert described["images"] == 12 and described["jpeg_quality"] == QUALITY
    assert described["mean_kb"] == round(float(np.mean(sizes)), 1)


def test_the_photos_carry_imagenets_classes(photos: Path) -> None:
    dataset = open_dataset(label_list(photos, 1000))
    assert dataset.num_classes == 1000 and len(dataset) == 12
    names = sorted(f.name for f in photos.rglob("*.jpg"))
    labels = dict(zip(dataset.keys, dataset.labels.tolist(), strict=True))
    assert [labels[k] for k in sorted(labels, key=lambda k: Path(k).name)] == [*range(11), 999]
    assert sorted(Path(k).name for k in labels) == names


def test_photos_are_the_same_for_a_seed_whatever_the_threads(photos: Path, tmp_path: Path) -> None:
    again = write_photos(tmp_path / "again", 12, classes=3, seed=5)
    other = write_photos(tmp_path / "other", 2, classes=3, seed=6)
    first = sorted(photos.rglob("*.jpg"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in sorted(again.rglob("*.jpg"))]
    assert first[0].read_bytes() != sorted(other.rglob("*.jpg"))[0].read_bytes()


def test_pool_models_carry_timm_data_configs_at_the_input_size(tmp_path: Path) -> None:
    assert parse_pool(None, on_gpu=True) == list(GPU_POOL)
    assert parse_pool(" ", on_gpu=False) == list(CPU_POOL)
    with pytest.raises(ConfigError, match="no architecture 'resnet5'"):
        parse_pool("resnet18,resnet5", on_gpu=False)
    specs = model_specs(["test_vit", "test_vit", "own:test_resnet"], tmp_path, 7, 48)
    assert [s.split("=")[0] for s in specs] == [
        "test_vit:test_vit", "test_vit-2:test_vit", "own:test_resnet",
    ]  # fmt: skip
    vit = load_model(ModelSpec.parse(specs[0]))
    timm_config = timm.data.resolve_model_data_config(timm.create_model("test_vit"))
    assert vit.data_config["input_size"] == [3, 48, 48]
    for key in ("interpolation", "mean", "std", "crop_pct"):
        assert tuple(np.atleast_1d(vit.data_config[key])) == tuple(np.atleast_1d(timm_config[key]))
    with torch.inference_mode():  # built for 48 px: its position embeddings fit
        assert vit.model(torch.zeros(2, 3, 48, 48)).shape == (2, 7)
    # a checkpoint of one's own is used as given
    assert model_specs([specs[2]], tmp_path / "none", 7, 48) == [specs[2]]


def test_steady_rate_leaves_out_the_warm_up() -> None:
    # batches of 10 images end at 1.0 (start-up), 1.5, 2.0, 2.5 s; the run ends at 3.0 s
    stamps = [(1.0, 10), (1.5, 10), (2.0, 10), (2.5, 10)]
    rate = bench_dump.steady_rate(stamps, warmup=2, end=3.0)
    # timed: batches 3 and 4 (20 images), from the end of batch 2 (1.5 s) to the end (3.0 s)
    assert rate == {"startup_s": 1.0, "timed_batches": 2, "timed_s": 1.5, "images_per_s": 13.3}
    with pytest.raises(ConfigError, match="only 4 batches"):
        bench_dump.steady_rate(stamps, warmup=4, end=3.0)


def test_bench_dump_reports_its_three_figures(tmp_path: Path) -> None:
    out = tmp_path / "dump.json"
    bench_dump.main(
        ["--pool", "test_vit,test_resnet", "--input-size", "32", "--images", "24", "--views",
         "2", "--batch-size", "8", "--warmup-batches", "1", "--backends", "torch",
         "--workers", "0", "--write-queues", "2,0", "--block-samples", "4", "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["views"] == 48 and result["photos"]["images"] == 24
    assert result["settings"]["classes"] == 1000  # ImageNet's: stored as top-k and a tail
    torch_ = result["backends"]["torch"]
    for key in ("loader", "dump_write_queue_2", "dump_write_queue_0"):
        assert torch_[key]["timed_batches"] == 48 // 8 - 1
        assert torch_[key]["images_per_s"] > 0
    ceiling = result["ceiling"]["images_per_s"]
    first, last = result["ceiling"]["first_and_last"]  # timed before and after the backends
    assert first["timed_batches"] == last["timed_batches"] == 20  # at least 20, cycled batches
    assert ceiling == round((first["images_per_s"] + last["images_per_s"]) / 2, 1)
    assert torch_["dump_write_queue_2_vs_ceiling"] == pytest.approx(
        torch_["dump_write_queue_2"]["images_per_s"] / ceiling, abs=1e-3
    )
    assert result["headline"] == {"torch": torch_["dump_write_queue_2_vs_ceiling"]}
    assert set(result["bytes_per_view"]) == {"test_vit", "test_resnet"}
    assert all(0 < size < 1000 for size in result["bytes_per_view"].values())  # not dense fp16


def test_bench_train_reports_every_variant_against_ce(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    bench_train.main(
        ["--arch", "test_vit", "--input-size", "32", "--batch", "4", "--steps", "2",
         "--warmup", "1", "--cached", "2", "--rounds", "2", "--workers", "0", "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert list(variants) == ["ce", "offline-1", "live-1", "offline-2", "live-2", "offline-4",
                              "live-4"]  # fmt: skip
    for entry in variants.values():
        assert entry["loader"]["timed_steps"] == entry["decoded"]["timed_steps"] == 2
        for kind in ("loader", "decoded"):  # the fastest of the 2 rounds
            rates = entry[kind]["rounds_images_per_s"]
            assert len(rates) == 2 and entry[kind]["images_per_s"] == max(rates)
        assert entry["loader_ratio_to_ce"] == pytest.approx(
            entry["loader"]["images_per_s"] / variants["ce"]["loader"]["images_per_s"], abs=1e-3
        )
    assert variants["ce"]["loader_ratio_to_ce"] == 1.0
    assert result["settings"]["classes"] == 1000
    assert result["photos"]["images"] == 4 * (1 + 2)  # --batch x (--warmup + --steps)
    headline = result["headline"]
    assert headline["ce_loader_bound"] == (variants["ce"]["loader_vs_decoded"] < 0.9)
    assert set(headline["offline_ratio_to_ce"]) == {"offline-1", "offline-2", "offline-4"}
    assert headline["offline_within_target"] == all(
        r >= headline["target"] for r in headline["offline_ratio_to_ce"].values()
    )
