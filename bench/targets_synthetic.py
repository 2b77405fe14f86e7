"""``fastkd bench targets``'s synthetic part: 1000-class rows, every tail model at equal bytes.

Two row generators (``GENERATORS``): a ranked one whose entropy spans confident to uncertain, and
a pessimistic Gaussian one. At each raw byte budget per stored view (``budget_settings``),
uniform and bucket keep the same top-k and the sampled tail trades top-k classes for draws; the
stored dense target is measured too, the floor of every sparse one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastkd.bench.target_errors import (
    DENSE,
    Setting,
    dense_kl,
    entropy_range,
    measure_setting,
    one_thread,
    quantile,
    rounded,
)
from fastkd.compression import TailModel, id_bytes, raw_bytes_per_view

# A sparse view's fixed bytes (true_logprob, log_tail, log_tail_sqrt): one class's row less one class.
FIXED_BYTES = raw_bytes_per_view(1000, 1, TailModel.BUCKET, 0) - (2 + id_bytes(1000))


def budget_settings(budget: int, num_classes: int) -> list[Setting]:
    """Every setting that stores at most ``budget`` raw bytes per view: uniform and bucket with the
    largest top-k that fits, the sampled tail with each top-k and the draws that fill the rest."""
    draw = id_bytes(num_classes)
    per_class = 2 + draw
    top = (budget - FIXED_BYTES) // per_class
    if top < 1:
        raise SystemExit(f"budget {budget} B: need at least {FIXED_BYTES + per_class} B")
    settings = [Setting(TailModel.UNIFORM.value, top), Setting(TailModel.BUCKET.value, top)]
    for topk in range(top, 0, -1):
        samples = (budget - FIXED_BYTES - topk * per_class) // draw
        if samples:
            settings.append(Setting(TailModel.SAMPLED.value, topk, samples))
    for setting in settings:
        assert budget - per_class < setting.bytes_per_view(num_classes) <= budget, setting
    return settings


def ranked_rows(
    rows: int, classes: int, gen: torch.Generator, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher logits falling with a random rank at a per-row slope: alpha near its low end gives
    flat, uncertain rows, near its high end confident ones. Label: the teacher's argmax."""
    f64 = torch.float64
    low, high = params["alpha_low"], params["alpha_high"]
    alpha = low + (high - low) * torch.rand(rows, 1, generator=gen, dtype=f64)
    rank = torch.rand(rows, classes, generator=gen).argsort(-1).to(f64) + 1.0
    noise = torch.randn(rows, classes, generator=gen, dtype=f64)
    teacher = -alpha * params["rank_scale"] * rank.log() + params["noise"] * noise
    labels = teacher.argmax(-1)
    student = teacher + params["student_noise"] * torch.randn(
        rows, classes, generator=gen, dtype=f64
    )
    return teacher, student, labels


def gaussian_rows(
    rows: int, classes: int, gen: torch.Generator, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian teacher logits leaning on a random label: a heavy, far-from-uniform tail holding
    most of the mass, the hard case for a summary of the tail."""
    f64 = torch.float64
    labels = torch.randint(0, classes, (rows,), generator=gen)
    teacher = params["std"] * torch.randn(rows, classes, generator=gen, dtype=f64)
    teacher[torch.arange(rows), labels] += params["label_boost"]
    student = teacher + params["student_noise"] * torch.randn(
        rows, classes, generator=gen, dtype=f64
    )
    return teacher, student, labels


@dataclass(frozen=True)
class RowGenerator:
    name: str
    formula: str
    params: dict[str, float]
    make: Callable[..., tuple[Tensor, Tensor, Tensor]]


GENERATORS = (
    RowGenerator(
        "ranked",
        "t = -alpha * rank_scale * log(rank) + noise * N(0, 1), rank a random permutation of "
        "1..C per row, alpha ~ U(alpha_low, alpha_high) per row, label = argmax t; "
        "z = t + student_noise * N(0, 1)",
        {
            "alpha_low": 0.5,
            "alpha_high": 3.0,
            "rank_scale": 3.0,
            "noise": 0.5,
            "student_noise": 1.0,
        },
        ranked_rows,
    ),
    RowGenerator(
        "gaussian",
        "t = std * N(0, 1) with the label's logit + label_boost, label uniform; "
        "z = t + student_noise * N(0, 1)",
        {"std": 2.5, "label_boost": 4.0, "student_noise": 1.0},
        gaussian_rows,
    ),
)


@dataclass(frozen=True)
class Rows:
    """One generator's rows, their description for the JSON and the dense reference per T."""

    teacher: Tensor
    student: Tensor
    labels: Tensor
    info: dict[str, Any]
    references: dict[float, tuple[Tensor, Tensor]]


def make_rows(
    row_gen: RowGenerator, rows: int, classes: int, seed: int, temperatures: Sequence[float]
) -> Rows:
    """``rows`` rows of ``row_gen`` from ``seed``, described, with the dense fp64 reference."""
    gen = torch.Generator().manual_seed(seed)
    teacher, student, labels = row_gen.make(rows, classes, gen, row_gen.params)
    references = {t: dense_kl(teacher, student, t) for t in temperatures}
    info = {
        "formula": row_gen.formula,
        "params": row_gen.params,
        "seed": seed,
        "entropy_nats": entropy_range(teacher),
        "label_is_teacher_argmax": rounded((teacher.argmax(-1) == labels).double().mean().item()),
        "dense_kl_median": {str(t): quantile(references[t][0], 0.5) for t in temperatures},
    }
    return Rows(teacher, student, labels, info, references)


@one_thread()
def synthetic_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every budget's settings (and the stored dense floor) on each generator's rows."""
    generators, results, best = {}, [], []
    for number, row_gen in enumerate(GENERATORS):
        made = make_rows(row_gen, args.rows, args.classes, args.seed + number, args.temperatures)
        generators[row_gen.name] = made.info
        draw_gen = torch.Generator().manual_seed(args.seed + 100 + number)
        budgets = [(None, DENSE)] + [
            (budget, s) for budget in args.budgets for s in budget_settings(budget, args.classes)
        ]
        for budget, setting in budgets:
            stats = measure_setting(
                made.teacher, made.student, made.labels, setting, args.temperatures,
                made.references, args.draws, draw_gen,
            )  # fmt: skip
            for temperature, figures in stats.items():
                results.append(
                    {
                        "generator": row_gen.name,
                        "budget_bytes": budget,
                        **setting.describe(args.classes),
                        "temperature": temperature,
                        **figures,
                    }
                )
        for budget in args.budgets:
            for temperature in args.temperatures:
                best.append(_ranking(results, row_gen.name, budget, temperature))
    return {
        "rows": args.rows,
        "classes": args.classes,
        "budgets_bytes": args.budgets,
        "temperatures": args.temperatures,
        "generators": generators,
        "results": results,
        "ranking": best,
    }


def _ranking(results: list[dict], generator: str, budget: int, temperature: float) -> dict:
    """The settings of one (generator, budget, T), best first by median gradient error."""
    rows = [
        r
        for r in results
        if r["generator"] == generator
        and r["budget_bytes"] == budget
        and r["temperature"] == temperature
    ]
    rows.sort(key=lambda r: r["grad_rel_l2"]["median"])
    return {
        "generator": generator,
        "budget_bytes": budget,
        "temperature": temperature,
        "by_median_grad_rel_l2": [
            [Setting(r["tail"], r["topk"], r["tail_samples"]).label, r["grad_rel_l2"]["median"]]
            for r in rows
        ],
    }
