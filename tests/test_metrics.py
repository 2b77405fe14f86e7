"""Transfer metrics on hand-computed cases (Roth et al.'s and the stricter ones, each against a
transcription of their code where they have one), and the report's JSON, table and plot."""

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
from fastkd.metrics import (
    TransferReport,
    agreement_matrix,
    knowledge_gain,
    knowledge_loss,
    positive_flips,
    success_rate,
    top1,
    transfer_delta,
    transfer_rate_per_class,
    transfer_rate_per_sample,
    transfer_report,
)


def _predictions(right: set[int], n: int = 10) -> np.ndarray:
    """All labels are 0: a prediction of 0 is right, 1 is wrong."""
    return np.array([0 if i in right else 1 for i in range(n)])


@pytest.fixture
def report() -> TransferReport:
    labels = np.zeros(10, dtype=np.int64)
    before = {
        "a": _predictions({0, 1, 2, 3, 4}),
        "b": _predictions({0, 5, 6, 8, 9}),
        "c": _predictions(set(range(10))),  # untrained pool member: only a teacher
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
    # b right and a wrong before: 5, 6, 8, 9; a now gets 5 and 6 of them (per sample: 2 of 4);
    # one class: a's 3 gains (5, 6, 7) over b's 4 flips (per class: 75%). a after is still
    # wrong on 8 and 9, which b gets right (flips after: 20%).
    assert a.positive_flips == pytest.approx({"b": 40.0, "c": 50.0})
    assert a.positive_flips_after == pytest.approx({"b": 20.0, "c": 40.0})
    assert a.transfer_rate_per_sample == pytest.approx({"b": 50.0, "c": 60.0})
    assert a.transfer_rate_per_class == pytest.approx({"b": 75.0, "c": 60.0})
    # a right and b wrong before: 1, 2, 3, 4; b learnt none of them.
    assert b.delta == 0.0 and b.knowledge_gain == 0.0 and b.knowledge_loss == 0.0
    assert b.positive_flips == b.positive_flips_after == pytest.approx({"a": 40.0, "c": 50.0})
    assert b.transfer_rate_per_sample == b.transfer_rate_per_class == {"a": 0.0, "c": 0.0}
    assert report.num_samples == 10 and report.improved() == 1
    assert success_rate([report]) == pytest.approx(50.0)  # a improved, b did not


def test_report_keeps_the_per_sample_data(report):
    assert report.labels == [0] * 10
    assert set(report.predictions_before) == {"a", "b", "c"}
    assert set(report.predictions_after) == {"a", "b"}
    assert report.predictions_after["a"] == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    assert all(type(p) is int for p in report.predictions_before["c"])


# Three classes, hand-computed: the two transfer rates disagree, and Roth's exceeds 100%.
LABELS = np.array([0, 0, 0, 1, 1, 2])
TEACHER = np.array([0, 9, 9, 9, 1, 2])  # right: 0, 4, 5
BEFORE = np.array([9, 9, 9, 9, 1, 2])  # right: 4, 5
AFTER = np.array([9, 0, 0, 1, 1, 2])  # right: 1, 2, 3, 4, 5


def test_each_figure_by_hand():
    assert top1(LABELS, BEFORE) == pytest.approx(100 * 2 / 6)
    assert top1(LABELS, AFTER) == pytest.approx(100 * 5 / 6)
    assert transfer_delta(LABELS, BEFORE, AFTER) == pytest.approx(50.0)
    assert knowledge_gain(LABELS, BEFORE, AFTER) == pytest.approx(50.0)  # 1, 2, 3
    assert knowledge_loss(LABELS, BEFORE, AFTER) == 0.0
    assert knowledge_loss(LABELS, AFTER, BEFORE) == pytest.approx(50.0)
    # The teacher's one positive flip is sample 0 (class 0), and the student still misses it.
    assert positive_flips(LABELS, TEACHER, BEFORE) == pytest.approx(100 / 6)
    assert positive_flips(LABELS, TEACHER, AFTER) == pytest.approx(100 / 6)
    assert transfer_rate_per_sample(LABELS, TEACHER, BEFORE, AFTER) == 0.0
    # Per class (Roth's code): the student's gains in class 0 (samples 1, 2) over the teacher's
    # one flip; its gain in class 1 (sample 3), where the teacher has no flip, is not counted.
    assert transfer_rate_per_class(LABELS, TEACHER, BEFORE, AFTER) == pytest.approx(200.0)
    # Gains on the flipped sample itself: 1 of 1 per sample, 3 of 1 per class.
    learnt = np.array([0, 0, 0, 1, 1, 2])
    assert transfer_rate_per_sample(LABELS, TEACHER, BEFORE, learnt) == 100.0
    assert transfer_rate_per_class(LABELS, TEACHER, BEFORE, learnt) == pytest.approx(300.0)


# -- Roth et al.'s code, transcribed (ExplainableML/FantasticGains, MIT licence,
# distillation/flip_study.py lines 104-145 and 201-225, the transfer rate only)


def _roth_flips_per_class(preds_a, preds_b, true_y):
    pos_flips = np.zeros((len(true_y), 1000))
    for i in range(len(true_y)):
        pos_flips[i, true_y[i]] = preds_a[i] != true_y[i] and preds_b[i] == true_y[i]
    return np.sum(pos_flips, axis=0)


def _roth_top_p_percent_classes(pos_class_flips, p):
    sorted_classes = np.argsort(pos_class_flips)[::-1]
    k = []
    for p_share in p:
        share, k_val = 0, 1
        while share < p_share:
            share = np.sum(pos_class_flips[sorted_classes[:k_val]]) / np.sum(pos_class_flips) * 100
            k_val += 1
        k.append(k_val)
    return k


def _roth_transfer_rate(preds, zero_preds, teach_preds, true_y, p=(2, 5, 20, 50, 100)):
    pos_flips = _roth_flips_per_class(zero_preds, teach_preds, true_y)
    dist_flips = _roth_flips_per_class(zero_preds, preds, true_y)
    k = _roth_top_p_percent_classes(pos_flips, p)
    sorted_classes = np.argsort(pos_flips)[::-1]
    return np.sum(dist_flips[sorted_classes[: k[-1]]]) / np.sum(pos_flips) * 100


@pytest.mark.parametrize("classes", [3, 10, 1000])
def test_per_class_rate_is_roths_code(classes):
    rng = np.random.default_rng(classes)
    n = 400 if classes < 1000 else 3000

    def model(labels, accuracy):
        return np.where(rng.random(n) < accuracy, labels, rng.integers(0, classes, size=n))

    for _ in range(5):
        labels = rng.integers(0, classes, size=n)
        teacher, before, after = model(labels, 0.7), model(labels, 0.5), model(labels, 0.6)
        expected = _roth_transfer_rate(after.tolist(), before.tolist(), teacher.tolist(), labels)
        found = transfer_rate_per_class(labels, teacher, before, after)
        assert found == pytest.approx(expected, rel=1e-12)


def test_per_class_rate_takes_one_class_past_those_with_flips():
    """Their k (p = 100%) is one more than the classes with flips: on 1000 classes the next
    class in argsort's order, one without flips, adds its gains too."""
    labels = np.repeat(np.arange(1000), 3)
    before = (labels + 1) % 1000  # all wrong
    after = labels  # all right: 3 gains in every class
    teacher = np.where(labels < 5, labels, before)  # right on classes 0-4 only: 15 flips
    assert transfer_rate_per_sample(labels, teacher, before, after) == 100.0
    expected = _roth_transfer_rate(after.tolist(), before.tolist(), teacher.tolist(), labels)
    assert expected == pytest.approx(100.0 * 18 / 15)  # 6 classes' gains over 5 classes' flips
    assert transfer_rate_per_class(labels, teacher, before, after) == pytest.approx(expected)


def test_rates_are_undefined_without_flips():
    labels = np.array([0, 1, 2])
    same = np.array([0, 1, 0])
    out = transfer_report(labels, {"a": same, "b": same}, {"a": np.array([0, 1, 2])})
    (a,) = out.models
    assert a.positive_flips == {"b": 0.0}
    assert math.isnan(a.transfer_rate_per_sample["b"])
    assert math.isnan(a.transfer_rate_per_class["b"])
    assert a.delta == pytest.approx(100 / 3)


def test_agreement_matrix():
    predictions = {"a": np.array([0, 1, 2, 3]), "b": np.array([0, 1, 0, 0]), "c": np.zeros(4)}
    expected = np.array([[100.0, 50.0, 25.0], [50.0, 100.0, 75.0], [25.0, 75.0, 100.0]])
    assert np.allclose(agreement_matrix(predictions), expected)
    assert agreement_matrix({}).shape == (0, 0)
    with pytest.raises(ValueError, match="one shape"):
        agreement_matrix({"a": np.zeros(3), "b": np.zeros(4)})


def test_success_rate_is_over_pairs_across_runs(report):
    assert success_rate([0.5, -1.0, 0.0, 2.0]) == pytest.approx(50.0)  # 0 is no success
    assert math.isnan(success_rate([]))
    # Each trained model of each report is one pair: 2 reports x 2 models plus one more delta.
    assert success_rate([report, report, 3.0]) == pytest.approx(60.0)
    assert success_rate(report.models[:1]) == 100.0
    with pytest.raises(ValueError, match="NaN"):
        success_rate([math.nan])


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
    assert "+10.00" in text and "b 40.0 -> 20.0, 50% | 75%" in text
    assert "1 of 2 trained models improved" in text

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
