"""Transfer metrics on a hand-computed case, and the report's JSON, table and plot."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from fastkd.data import open_dataset
from fastkd.digits import write_digits_folder
from fastkd.evaluation import evaluate
from fastkd.metrics import TransferReport, transfer_report


def _predictions(right: set[int], n: int = 10) -> np.ndarray:
    """All labels are 0: a prediction of 0 is right, 1 is wrong."""
    return np.array([0 if i in right else 1 for i in range(n)])


@pytest.fixture
def report() -> TransferReport:
    labels = np.zeros(10, dtype=np.int64)
    before = {
        "a": _predictions({0, 1, 2, 3, 4}),
        "b": _predictions({0, 5, 6, 8, 9}),
        "c": _predictions(set(range(10))),  # untrained pool member: only a reference for flips
    }
    after = {"a": _predictions({0, 1, 2, 5, 6, 7}), "b": _predictions({0, 5, 6, 8, 9})}
    return transfer_report(labels, before, after)


def test_hand_computed_transfer_figures(report):
    a, b = report.models
    assert (a.name, b.name) == ("a", "b")
    assert (a.top1_before, a.top1_after) == pytest.approx((50.0, 60.0))
    assert a.delta == pytest.approx(10.0)
    assert a.knowledge_gain == pytest.approx(30.0)  # wrong before, right after: 5, 6, 7
    assert a.knowledge_loss == pytest.approx(20.0)  # right before, wrong after: 3, 4
    assert a.delta == pytest.approx(a.knowledge_gain - a.knowledge_loss)
    # b right and a wrong before: 5, 6, 8, 9; a now gets 5 and 6 of them.
    assert a.positive_flips == pytest.approx({"b": 40.0, "c": 50.0})
    assert a.transfer_rate == pytest.approx({"b": 50.0, "c": 60.0})
    # a right and b wrong before: 1, 2, 3, 4; b learnt none of them.
    assert b.delta == 0.0 and b.knowledge_gain == 0.0 and b.knowledge_loss == 0.0
    assert b.positive_flips == pytest.approx({"a": 40.0, "c": 50.0})
    assert b.transfer_rate == pytest.approx({"a": 0.0, "c": 0.0})
    assert report.success_rate == pytest.approx(50.0)  # a improved, b did not
    assert report.num_samples == 10


def test_transfer_rate_is_undefined_without_flips():
    labels = np.array([0, 1, 2])
    same = np.array([0, 1, 0])
    out = transfer_report(labels, {"a": same, "b": same}, {"a": np.array([0, 1, 2])})
    (a,) = out.models
    assert a.positive_flips == {"b": 0.0}
    assert math.isnan(a.transfer_rate["b"])
    assert a.delta == pytest.approx(100 / 3) and out.success_rate == 100.0


def test_bad_input_is_named():
    labels = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match="'before' predictions for trained model"):
        transfer_report(labels, {"a": labels}, {"b": labels})
    with pytest.raises(ValueError, match="predictions of 'a' have shape"):
        transfer_report(labels, {"a": labels[:3]}, {"a": labels})


def test_json_round_trip_table_and_plot(report, tmp_path):
    path = report.save_json(tmp_path / "report.json")
    assert TransferReport.from_dict(json.loads(path.read_text())) == report

    console = Console(width=200, record=True)
    console.print(report.table())
    text = console.export_text()
    assert "+10.00" in text and "b 40.0 -> 50%" in text and "success rate 50%" in text

    png = report.plot(tmp_path / "plots" / "report.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 600
        # Not a blank canvas: the bars and heatmap give many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50


def test_evaluate_predicts_on_each_models_eval_view(tmp_path):
    """Exact reference: 32 px images, so the eval view of crop_pct 1.0 at 32 px is the image
    itself and that of crop_pct 0.5 at 16 px is its centre 16 x 16, both without resampling."""
    root = write_digits_folder(tmp_path / "digits", image_size=32) / "val"
    listing = root / "some.txt"
    listing.write_text(
        "".join(f"{c}/{next((root / str(c)).glob('*.png')).name} {c}\n" for c in range(10))
    )
    dataset = open_dataset(listing)
    config = {"interpolation": "bilinear", "mean": [0.2, 0.3, 0.4], "std": [0.5, 0.6, 0.7]}
    configs = {
        "whole": {**config, "input_size": [3, 32, 32], "crop_pct": 1.0},
        "centre": {**config, "input_size": [3, 16, 16], "crop_pct": 0.5},
    }
    torch.manual_seed(0)
    models = {  # a random linear map of the pixels: the prediction depends on every one
        name: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, 10))
        for name, size in (("whole", 32), ("centre", 16))
    }
    predictions = evaluate(models, configs, dataset, batch_size=4, backend="torch")

    mean, std = (
        torch.tensor(config["mean"]).view(3, 1, 1),
        torch.tensor(config["std"]).view(3, 1, 1),
    )
    for name, box in (("whole", (0, 0, 32, 32)), ("centre", (8, 8, 24, 24))):
        images = []
        for key in dataset.keys:
            with Image.open(dataset.root / key) as image:
                pixels = np.asarray(image.convert("RGB").crop(box), dtype=np.float32) / 255.0
            images.append((torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std)
        with torch.no_grad():
            expected = models[name](torch.stack(images)).argmax(1).numpy()
        assert np.array_equal(predictions[name], expected), name
    assert len(set(predictions["whole"].tolist())) > 1  # not a constant model
    subset = np.array([5, 0, 3])  # a rank's slice: the same predictions, in the slice's order
    part = evaluate(models, configs, dataset, batch_size=2, backend="torch", samples=subset)
    for name, found in part.items():
        assert np.array_equal(found, predictions[name][subset]), name
