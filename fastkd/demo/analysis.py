"""What the demo's predictions show: every number of the report, computed once from them.

The unit of evidence is a test image: each fold's test images are its own, so across the folds
every image of the digits is tested once. A comparison pairs two sets of predictions on the same
images (and the same seed); its interval is a paired bootstrap over images within folds, and over
the transfer seeds within folds when there are several (``fastkd.statistics``: hierarchical), so
with ``--seeds N`` it covers the spread of training too. A member succeeds under an arm when its
change beats its change under the control arm (CE fine-tuning) with the interval above zero. The
transfer figures are Roth et al.'s and the stricter per-sample ones
(``fastkd.metrics``, docs/metrics.md), each of one (teacher, student) pair in one run (fold,
seed), averaged over the runs; top-1 is over all folds' test images together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fastkd.demo.config import CONTROL_ARM, QUESTIONS
from fastkd.demo.predictions import FoldPredictions
from fastkd.errors import ConfigError
from fastkd.metrics import agreement_matrix, success_rate, top1, transfer_report
from fastkd.statistics import paired_bootstrap

Runs = Mapping[int, Mapping[int, FoldPredictions]]  # fold -> seed -> predictions


def _check_pairing(before: Mapping[int, FoldPredictions], after: Mapping[str, Runs]) -> None:
    """Every run of a fold predicts the same images in the same order as the pool before."""
    for arm, runs in after.items():
        for fold, by_seed in runs.items():
            for seed, found in by_seed.items():
                if found.samples != before[fold].samples:
                    raise ConfigError(
                        f"arm {arm!r}, fold {fold}, seed {seed}: other test images than the pool's"
                    )


def _concat(parts: Sequence[FoldPredictions], names: Sequence[str]) -> tuple[np.ndarray, dict]:
    labels = np.concatenate([np.asarray(p.labels) for p in parts])
    predictions = {n: np.concatenate([np.asarray(p.predictions[n]) for p in parts]) for n in names}
    return labels, predictions


Value = Callable[[int, int, str], np.ndarray]  # (fold, seed, member) -> per-image values


def _strata(
    folds: Sequence[int], seeds: Sequence[int], members: Sequence[str], value: Value
) -> list[np.ndarray]:
    """Per fold, float [members, seeds, images] of ``value``: the bootstrap's strata."""
    return [
        np.asarray([[value(f, s, m) for s in seeds] for m in members], dtype=np.float64)
        for f in folds
    ]


def analyse(
    members: Sequence[str],
    before: Mapping[int, FoldPredictions],
    after: Mapping[str, Runs],
    *,
    resamples: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The report's numbers (JSON-able): the pool before, each arm per member and pooled, each
    member's success against the control arm, the declared questions with their intervals,
    knowledge loss and verdicts."""
    _check_pairing(before, after)
    folds = sorted(before)
    seeds = sorted({s for runs in after.values() for by_seed in runs.values() for s in by_seed})
    labels, predicted_before = _concat([before[f] for f in folds], members)
    boot = {"resamples": resamples, "seed": seed}

    def right(runs: Runs) -> Value:
        return lambda f, s, m: runs[f][s].correct(m).astype(np.float64)

    def lost(runs: Runs) -> Value:  # right before transfer, wrong after: knowledge loss
        return lambda f, s, m: (before[f].correct(m) & ~runs[f][s].correct(m)).astype(np.float64)

    def was_right(f: int, s: int, m: str) -> np.ndarray:
        return before[f].correct(m).astype(np.float64)

    def minus(a: Value, b: Value) -> Value:
        return lambda f, s, m: a(f, s, m) - b(f, s, m)

    def interval(value: Value, who: Sequence[str] = members) -> dict[str, Any]:
        return paired_bootstrap(_strata(folds, seeds, who, value), **boot).to_dict()

    out: dict[str, Any] = {
        "images": int(labels.size),
        "folds": folds,
        "seeds": seeds,
        "control": CONTROL_ARM,
        "top1_before": {m: top1(labels, predicted_before[m]) for m in members},
        "agreement_before": agreement_matrix(predicted_before).tolist(),
        "arms": {},
        "questions": [],
    }
    control = after.get(CONTROL_ARM)
    for arm, runs in after.items():
        # Roth's figures are per (teacher, student) pair of one run (fold, seed): computed per
        # run, then averaged over the runs; top-1 is over all folds' test images together.
        per_run = [
            transfer_report(
                np.asarray(before[f].labels),
                {m: np.asarray(before[f].predictions[m]) for m in members},
                {m: np.asarray(runs[f][s].predictions[m]) for m in members},
            )
            for f in folds
            for s in seeds
        ]
        scored = control is not None and arm != CONTROL_ARM
        figures = {}
        for i, member in enumerate(members):
            after_member = {
                s: np.concatenate([runs[f][s].predictions[member] for f in folds]) for s in seeds
            }
            figures[member] = {
                "top1_after": _nanmean([top1(labels, after_member[s]) for s in seeds]),
                "delta": interval(minus(right(runs), was_right), [member]),
                **_mean_fields([report.models[i] for report in per_run]),
            }
            if scored:  # the member's change minus its change under the control arm
                vs = interval(minus(right(runs), right(control)), [member])
                figures[member]["vs_control"] = vs
                figures[member]["success"] = vs["low"] > 0
        out["arms"][arm] = {
            "members": figures,
            "pool_delta": interval(minus(right(runs), was_right)),
            # Roth et al.'s: % of (teachers, student) runs with a change > 0 (any fine-tuning of
            # an under-trained member scores, so it cannot tell transfer from training)
            "success_rate_roth": success_rate(per_run),
            "runs": sum(len(report.models) for report in per_run),
            # % of members whose change beats the control's (interval above 0); None for the
            # control itself, which is not scored against itself
            "success_rate": 100.0 * float(np.mean([figures[m]["success"] for m in members]))
            if scored
            else None,
            "agreement_after": np.mean(
                [agreement_matrix(_concat([runs[f][s] for f in folds], members)[1]) for s in seeds],
                axis=0,
            ).tolist(),  # mean over seeds
        }
    for question in QUESTIONS:
        if question.arm not in after or question.control not in after:
            continue
        arm, control_runs = after[question.arm], after[question.control]
        difference = paired_bootstrap(
            _strata(folds, seeds, members, minus(right(arm), right(control_runs))), **boot
        )
        out["questions"].append(
            {
                "arm": question.arm,
                "control": question.control,
                "role": question.role,
                "difference": difference.to_dict(),
                "verdict": difference.verdict(),
                # Roth's concern: what the student knew and lost (% of test images per member)
                "knowledge_loss": {
                    "arm": interval(lost(arm))["estimate"],
                    "control": interval(lost(control_runs))["estimate"],
                    "difference": interval(minus(lost(arm), lost(control_runs))),
                },
            }
        )
    return out


def _mean_fields(models: Sequence[Any]) -> dict[str, Any]:
    """The mean over seeds of each per-model figure of ``transfer_report`` (numbers, and
    dicts of numbers per other member)."""
    out: dict[str, Any] = {}
    first = models[0]
    for name, value in vars(first).items():
        if name in ("name", "top1_before", "top1_after", "delta"):
            continue
        if isinstance(value, dict):
            out[name] = {k: _nanmean([getattr(m, name)[k] for m in models]) for k in value}
        elif isinstance(value, float):
            out[name] = _nanmean([getattr(m, name) for m in models])
    return out


def _nanmean(values: Sequence[float]) -> float:
    """The mean of the defined values (a rate without flips is NaN); NaN if none is."""
    array = np.asarray(values, dtype=np.float64)
    defined = array[~np.isnan(array)]
    return float(defined.mean()) if defined.size else float("nan")
