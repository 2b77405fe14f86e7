"""Transfer metrics (Roth et al., ICLR 2024), in their definitions beside stricter ones.

Every figure is computed from per-sample predictions (numpy, no model), in percent of the
evaluation samples (points) unless said otherwise; docs/metrics.md gives each formula with a
worked example. For a student ``m`` (a trained model) and a teacher ``o`` (another pool member,
taken as it was before training):

- ``top1``; ``transfer_delta`` = top-1 after - top-1 before;
- ``knowledge_gain``: samples ``m`` got wrong before and right after; ``knowledge_loss``: the
  reverse (``delta = gain - loss``);
- ``positive_flips(labels, o, m)``: samples where ``o`` is right and ``m`` wrong; with ``m``'s
  predictions before training, what ``o`` could teach (Roth's positive flips); with ``m``'s
  predictions after, what is still left to learn;
- ``transfer_rate_per_class``: Roth et al.'s code (distillation/flip_study.py): the student's
  gains on every sample of the classes where the teacher has positive flips, over the teacher's
  positive-flip count; it can exceed 100%;
- ``transfer_rate_per_sample``: the stricter rate: the share of the flipped samples themselves that
  the student now gets right (at most 100%);
- ``success_rate``: over (teachers, student) pairs across runs, the share with delta > 0 (a pair
  is one student's training run, in one fold and seed, whatever the number of its teachers);
- ``agreement_matrix``: the share of samples on which two pool members predict the same class.

``transfer_report`` turns per-sample predictions (``fastkd.evaluation`` makes them) into a
``TransferReport`` that keeps the labels and predictions (for a bootstrap later:
``fastkd.statistics``); ``fastkd.transfer_rendering`` draws it: JSON, a rich table, a PNG plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from fastkd.errors import ConfigError
from fastkd.transfer_rendering import TransferRendering

# Roth et al.'s per-class flip counts have 1000 slots (ImageNet's classes), whatever the data:
# ExplainableML/FantasticGains, distillation/flip_study.py, get_flips_per_class (lines 115-116).
# The slots matter: their transfer rate sums one class past those with flips (see
# transfer_rate_per_class), and which class that is depends on the zero slots.
ROTH_CLASS_SLOTS = 1000


def _percent(mask: np.ndarray) -> float:
    return 100.0 * float(mask.mean()) if mask.size else math.nan


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {labels.shape}")
    return labels


def _correct(predictions, labels: np.ndarray, name: str) -> np.ndarray:
    predictions = np.asarray(predictions)
    if predictions.shape != labels.shape:
        raise ConfigError(
            f"predictions of {name!r} have shape {predictions.shape}, the labels {labels.shape}"
        )
    return predictions == labels


# -- figures of one model, or one (teacher, student) pair ------------------------------------------


def top1(labels, predictions) -> float:
    """% of samples predicted right."""
    labels = _labels(labels)
    return _percent(_correct(predictions, labels, "predictions"))


def transfer_delta(labels, before, after) -> float:
    """top-1 after - top-1 before, in points."""
    return top1(labels, after) - top1(labels, before)


def knowledge_gain(labels, before, after) -> float:
    """% of samples wrong before and right after."""
    labels = _labels(labels)
    return _percent(~_correct(before, labels, "before") & _correct(after, labels, "after"))


def knowledge_loss(labels, before, after) -> float:
    """% of samples right before and wrong after."""
    labels = _labels(labels)
    return _percent(_correct(before, labels, "before") & ~_correct(after, labels, "after"))


def positive_flips(labels, teacher, student) -> float:
    """% of samples where ``teacher`` is right and ``student`` wrong.

    With the student's predictions before training: Roth et al.'s positive flips of the pair, what
    the teacher could teach. With its predictions after (the teacher's still from before): what is
    left to learn. (Their code: flip_study.py, get_flips, lines 97-99; dist_utils.py, get_metrics,
    lines 206-207 and 213, compares the student after with the teacher the same way.)
    """
    labels = _labels(labels)
    return _percent(_correct(teacher, labels, "teacher") & ~_correct(student, labels, "student"))


def transfer_rate_per_sample(labels, teacher, before, after) -> float:
    """% of the positive flips before training (``teacher`` right, the student ``before`` wrong)
    that the student gets right ``after``: the flipped samples themselves. NaN without flips."""
    labels = _labels(labels)
    flips = _correct(teacher, labels, "teacher") & ~_correct(before, labels, "before")
    return _percent(_correct(after, labels, "after")[flips])


def transfer_rate_per_class(labels, teacher, before, after) -> float:
    """Roth et al.'s transfer rate, as their code computes it, in %.

    ExplainableML/FantasticGains, distillation/flip_study.py, ``get_dist_improvement`` (lines
    201-225), from ``get_flips_per_class`` (lines 104-124) and ``get_top_p_percent_classes``
    (lines 127-145); called by dist_utils.py ``get_metrics`` (line 208) with (student after,
    student before, teacher, labels)::

        pos_flips, _ = get_flips_per_class(zero_preds, teach_preds, true_y)  # per class: student
        dist_flips, _ = get_flips_per_class(zero_preds, preds, true_y)       # before wrong, the
        k = get_top_p_percent_classes(pos_flips, p)                          # other right
        sorted_classes = np.argsort(pos_flips)[::-1]
        transfer_rate = np.sum(dist_flips[sorted_classes[:k[-1]]]) / np.sum(pos_flips) * 100

    that is: the student's gains (wrong before, right after) on all samples of the classes where
    the teacher has positive flips, over the teacher's positive-flip count. Gains in those
    classes on samples the teacher also got wrong count too, so the rate can exceed 100%.

    Reproduced exactly, with two details of their code: ``k[-1]`` (p = 100%) is one more than the
    number of classes with flips (their loop increments ``k_val`` after the share reaches 100%),
    so the sum also takes the next class in ``argsort``'s order, one without flips; and the
    counts have 1000 slots (``ROTH_CLASS_SLOTS``; more here when a label is >= 1000, where their
    code fails). With fewer classes than slots that extra class is, in numpy's argsort, an empty
    slot (on 10 classes, one of 328-345), so the rate is exactly the sentence above; on 1000
    classes it adds the gains of one class without flips. NaN without flips (their code divides
    by zero).
    """
    labels = _labels(labels)
    teacher_right = _correct(teacher, labels, "teacher")
    was, now = _correct(before, labels, "before"), _correct(after, labels, "after")
    if labels.size and labels.min() < 0:
        raise ConfigError(f"labels must be class indices >= 0, got {labels.min()}")
    slots = max(ROTH_CLASS_SLOTS, int(labels.max()) + 1) if labels.size else ROTH_CLASS_SLOTS
    flips = np.bincount(labels[teacher_right & ~was], minlength=slots).astype(np.float64)
    gains = np.bincount(labels[~was & now], minlength=slots).astype(np.float64)
    total = flips.sum()
    if total == 0:
        return math.nan
    order = np.argsort(flips)[::-1]  # float64 counts as theirs, so the same order of ties
    k = int(np.count_nonzero(flips)) + 1  # get_top_p_percent_classes(flips, [100])[0]
    return float(np.sum(gains[order[:k]]) / total * 100)


# -- across models and runs ------------------------------------------------------------------------


def agreement_matrix(predictions: Mapping[str, np.ndarray]) -> np.ndarray:
    """float [M, M] in the mapping's order: % of samples on which members i and j predict the
    same class (100 on the diagonal; NaN without samples)."""
    names = list(predictions)
    stacked = [np.asarray(predictions[n]) for n in names]
    if stacked and any(p.shape != stacked[0].shape or p.ndim != 1 for p in stacked):
        shapes = {n: p.shape for n, p in zip(names, stacked, strict=True)}
        raise ConfigError(f"agreement needs 1-D predictions of one shape, got {shapes}")
    if not stacked or stacked[0].size == 0:
        return np.full((len(names), len(names)), math.nan)
    p = np.stack(stacked)
    return 100.0 * (p[:, None, :] == p[None, :, :]).mean(axis=2)


def success_rate(runs: Iterable[float | ModelTransfer | TransferReport]) -> float:
    """% of (teachers, student) pairs with a positive transfer delta, over many runs.

    A pair is one student's training run: one trained model in one fold and seed, whether it
    learnt from one teacher or from a pool (then its teachers are the pool's other members, and
    the pair counts once). ``runs``: each item a pair's delta (points), a ``ModelTransfer`` (its
    delta) or a whole ``TransferReport`` (each of its trained models is one pair). NaN when empty.
    """
    deltas: list[float] = []
    for run in runs:
        if isinstance(run, TransferReport):
            deltas.extend(m.delta for m in run.models)
        elif isinstance(run, ModelTransfer):
            deltas.append(run.delta)
        else:
            deltas.append(float(run))
    if any(math.isnan(d) for d in deltas):
        raise ConfigError("success_rate: a pair's transfer delta is NaN (no evaluation samples)")
    return _percent(np.array([d > 0 for d in deltas], dtype=bool))


# -- the report ------------------------------------------------------------------------------------


@dataclass
class ModelTransfer:
    """One trained model's transfer figures, in % of the evaluation samples; the dicts are per
    teacher (every other pool member, as it was before training)."""

    name: str
    top1_before: float
    top1_after: float
    delta: float  # transfer delta: top1_after - top1_before
    knowledge_gain: float
    knowledge_loss: float
    positive_flips: dict[str, float]  # before training: the teacher right, this model wrong
    positive_flips_after: dict[str, float]  # the teacher (before) right, this model after wrong
    transfer_rate_per_sample: dict[str, float]  # % of the flipped samples now right (<= 100)
    transfer_rate_per_class: dict[str, float]  # Roth et al.'s code (can exceed 100)


_RATES = ("transfer_rate_per_sample", "transfer_rate_per_class")


@dataclass
class TransferReport(TransferRendering):
    """Per-model transfer figures, with the per-sample data they are computed from: the labels
    and every model's predictions before and after (class ids), so that a later analysis can
    resample the samples (``fastkd.statistics``) or recompute any figure. Shown and saved by
    the methods of ``TransferRendering``: ``table()``, ``plot(path)``, ``save(stem)``."""

    models: list[ModelTransfer]
    num_samples: int
    labels: list[int] = field(default_factory=list)
    predictions_before: dict[str, list[int]] = field(default_factory=dict)  # every pool member
    predictions_after: dict[str, list[int]] = field(default_factory=dict)  # the trained models
    # What produced it (``fastkd.training.report.provenance``): the data, whether that data also
    # selected the weights, the run's settings, each model's relative weight change.
    context: dict = field(default_factory=dict)
    # Per trained model, with a control run: top-1 minus the control's, with its interval, and
    # the control's predictions (class ids), from which the interval can be recomputed.
    control: dict[str, dict] = field(default_factory=dict)
    predictions_control: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TransferReport:
        def undefined_as_nan(rates: dict) -> dict:
            return {k: math.nan if v is None else v for k, v in rates.items()}

        models = [
            ModelTransfer(**{**m, **{r: undefined_as_nan(m[r]) for r in _RATES}})
            for m in values["models"]
        ]
        return cls(
            models=models,
            num_samples=values["num_samples"],
            labels=[int(y) for y in values["labels"]],
            predictions_before={
                k: [int(p) for p in v] for k, v in values["predictions_before"].items()
            },
            predictions_after={
                k: [int(p) for p in v] for k, v in values["predictions_after"].items()
            },
            context=values.get("context", {}),
            control=values.get("control", {}),
            predictions_control={
                k: [int(p) for p in v] for k, v in values.get("predictions_control", {}).items()
            },
        )

    def improved(self) -> int:
        """How many of the trained models have a positive transfer delta."""
        return sum(m.delta > 0 for m in self.models)


def transfer_report(
    labels: np.ndarray,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
) -> TransferReport:
    """Transfer figures of every model in ``after`` from per-sample predictions.

    labels: int [n]. before: predictions [n] of every pool member before training (members that
    were not trained are the others' teachers for flips and rates). after: predictions [n] of
    the trained models, each also present in ``before``. The report keeps all of them.
    """
    labels = _labels(labels)
    missing = sorted(set(after) - set(before))
    if missing:
        raise ConfigError(f"no 'before' predictions for trained model(s) {missing}")
    for name, predictions in [*before.items(), *after.items()]:
        _correct(predictions, labels, name)  # every shape checked here, naming the model
    models = []
    for name, now in after.items():
        was = before[name]
        teachers = {other: p for other, p in before.items() if other != name}
        models.append(
            ModelTransfer(
                name=name,
                top1_before=top1(labels, was),
                top1_after=top1(labels, now),
                delta=transfer_delta(labels, was, now),
                knowledge_gain=knowledge_gain(labels, was, now),
                knowledge_loss=knowledge_loss(labels, was, now),
                positive_flips={o: positive_flips(labels, t, was) for o, t in teachers.items()},
                positive_flips_after={
                    o: positive_flips(labels, t, now) for o, t in teachers.items()
                },
                transfer_rate_per_sample={
                    o: transfer_rate_per_sample(labels, t, was, now) for o, t in teachers.items()
                },
                transfer_rate_per_class={
                    o: transfer_rate_per_class(labels, t, was, now) for o, t in teachers.items()
                },
            )
        )
    return TransferReport(
        models=models,
        num_samples=int(labels.size),
        labels=_ints(labels),
        predictions_before={name: _ints(p) for name, p in before.items()},
        predictions_after={name: _ints(p) for name, p in after.items()},
    )


def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).tolist()]
