"""What the demo's predictions show: every number of the report, computed once from them.

The unit of evidence is a test image: each fold's test images are its own, so across the folds
every image of the digits is tested once. A comparison pairs two sets of predictions on the same
images (and the same seed); its interval is a paired bootstrap over images within folds
(``fastkd.statistics``); the transfer figures are Roth et al.'s and the stricter per-sample ones
(``fastkd.metrics``, docs/metrics.md), each of one (teacher, student) pair in one run (fold,
seed), averaged over the runs; top-1 is over all folds' test images together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastkd.demo.config import QUESTIONS
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


def _differences(
    folds: Sequence[int],
    seeds: Sequence[int],
    members: Sequence[str],
    new: Runs,
    old: Runs | Mapping[int, FoldPredictions],
) -> list[np.ndarray]:
    """Per fold, [members x seeds, images] of correct(new) - correct(old) (1, 0 or -1); ``old``
    is either runs of another arm (paired by seed) or the pool before (one per fold)."""
    strata = []
    for fold in folds:
        rows = []
        for member in members:
            for seed in seeds:
                reference = old[fold]
                if not isinstance(reference, FoldPredictions):
                    reference = reference[seed]
                rows.append(
                    new[fold][seed].correct(member).astype(np.int8)
                    - reference.correct(member).astype(np.int8)
                )
        strata.append(np.stack(rows).astype(np.float64))
    return strata


def analyse(
    members: Sequence[str],
    before: Mapping[int, FoldPredictions],
    after: Mapping[str, Runs],
    *,
    resamples: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The report's numbers (JSON-able): the pool before, each arm per member and pooled, the
    declared questions with their intervals and verdicts."""
    _check_pairing(before, after)
    folds = sorted(before)
    seeds = sorted({s for runs in after.values() for by_seed in runs.values() for s in by_seed})
    labels, predicted_before = _concat([before[f] for f in folds], members)
    boot = {"resamples": resamples, "seed": seed}

    out: dict[str, Any] = {
        "images": int(labels.size),
        "folds": folds,
        "seeds": seeds,
        "top1_before": {m: top1(labels, predicted_before[m]) for m in members},
        "agreement_before": agreement_matrix(predicted_before).tolist(),
        "arms": {},
        "questions": [],
    }
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
        figures = {}
        for i, member in enumerate(members):
            after_member = {
                s: np.concatenate([runs[f][s].predictions[member] for f in folds]) for s in seeds
            }
            delta = paired_bootstrap(_differences(folds, seeds, [member], runs, before), **boot)
            figures[member] = {
                "top1_after": _nanmean([top1(labels, after_member[s]) for s in seeds]),
                "delta": delta.to_dict(),
                **_mean_fields([report.models[i] for report in per_run]),
            }
        agreement = [
            agreement_matrix(_concat([runs[f][s] for f in folds], members)[1]) for s in seeds
        ]
        out["arms"][arm] = {
            "members": figures,
            "pool_delta": paired_bootstrap(
                _differences(folds, seeds, members, runs, before), **boot
            ).to_dict(),
            "success_rate": success_rate(per_run),
            "runs": sum(len(report.models) for report in per_run),
            "agreement_after": np.mean(agreement, axis=0).tolist(),  # mean over seeds
        }
    for question in QUESTIONS:
        if question.arm not in after or question.control not in after:
            continue
        interval = paired_bootstrap(
            _differences(folds, seeds, members, after[question.arm], after[question.control]),
            **boot,
        )
        out["questions"].append(
            {
                "arm": question.arm,
                "control": question.control,
                "role": question.role,
                "difference": interval.to_dict(),
                "verdict": interval.verdict(),
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
