"""``fastkd bench targets``'s populations part: every tail model at one top-k, per row population.

Four populations, each named in the JSON: three synthetic 1000-class ones (``POPULATIONS``:
confident, high-entropy, label-smoothed) and the demo pool's real outputs (10 classes: every
ordered (teacher, student) pair of its members on the split a dump stores). Each tail model is
measured at each top-k (the sampled one with the dump's default draws) and T, as a store keeps
and training reads it (``measure_setting``, ``pair_errors``). ``default_choice`` applies the
criterion of docs/method.md ("How the default tail model is chosen") to the figures.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from fastkd.bench.target_errors import (
    DENSE,
    Setting,
    entropy_range,
    measure_setting,
    one_thread,
    rounded,
)
from fastkd.bench.targets_pool import demo_config, eval_view_logits, pair_errors, pool_settings
from fastkd.bench.targets_synthetic import RowGenerator, make_rows
from fastkd.compression import TailModel
from fastkd.demo.config import DemoLayout
from fastkd.demo.run import pretrain_pool

POOL = "demo_pool"
POOL_SPLIT = "train"  # the split a dump stores the pool's targets of
CHOICE_TOPK = 10  # the criterion's k, its tie-break's, its temperatures, and the tie margin
TIE_TOPK = 5
CHOICE_TEMPERATURES = (1.0, 2.0)
TIE_MARGIN = 0.01


def _student(teacher: Tensor, gen: torch.Generator, params: dict[str, float]) -> Tensor:
    noise = torch.randn(teacher.shape, generator=gen, dtype=teacher.dtype)
    return teacher + params["student_noise"] * noise


def confident_rows(
    rows: int, classes: int, gen: torch.Generator, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """N(0, 1) logits with the label and two other random classes raised: most of the mass on
    the label, some on two rivals, a few percent over the rest."""
    f64 = torch.float64
    teacher = torch.randn(rows, classes, generator=gen, dtype=f64)
    boosted = torch.rand(rows, classes, generator=gen).argsort(-1)[:, :3]
    low = torch.tensor([params["label_low"], params["rival_low"], params["rival_low"]], dtype=f64)
    high = torch.tensor(
        [params["label_high"], params["rival_high"], params["rival_high"]], dtype=f64
    )
    raise_by = low + (high - low) * torch.rand(rows, 3, generator=gen, dtype=f64)
    teacher.scatter_add_(1, boosted, raise_by)
    return teacher, _student(teacher, gen, params), boosted[:, 0]


def high_entropy_rows(
    rows: int, classes: int, gen: torch.Generator, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """N(0, std^2) logits and a random label: nearly all the mass in the tail."""
    teacher = params["std"] * torch.randn(rows, classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    return teacher, _student(teacher, gen, params), labels


def label_smoothed_rows(
    rows: int, classes: int, gen: torch.Generator, params: dict[str, float]
) -> tuple[Tensor, Tensor, Tensor]:
    """A label-smoothed model's outputs: the smoothed cross-entropy's optimum (label 1 - eps +
    eps / C, every other class eps / C) with the label's probability drawn in [label_low,
    label_high] (a model is less sure of harder images) and the other classes' shares
    log-normally spread around even (a model is not exactly at its optimum)."""
    f64 = torch.float64
    labels = torch.randint(0, classes, (rows,), generator=gen)
    share = params["spread"] * torch.randn(rows, classes, generator=gen, dtype=f64)
    share[torch.arange(rows), labels] = float("-inf")
    rest = share.log_softmax(-1)  # the others' shares of the mass off the label
    low, high = params["label_low"], params["label_high"]
    label_p = low + (high - low) * torch.rand(rows, generator=gen, dtype=f64)
    teacher = rest + (1.0 - label_p).log().unsqueeze(-1)
    teacher[torch.arange(rows), labels] = label_p.log()
    return teacher, _student(teacher, gen, params), labels


POPULATIONS = (
    RowGenerator(
        "confident",
        "t = N(0, 1); the label + U(label_low, label_high), two other random classes + "
        "U(rival_low, rival_high); z = t + student_noise * N(0, 1)",
        {
            "label_low": 9.0,
            "label_high": 12.0,
            "rival_low": 5.0,
            "rival_high": 8.0,
            "student_noise": 1.0,
        },
        confident_rows,
    ),
    RowGenerator(
        "high_entropy",
        "t = std * N(0, 1), label uniform; z = t + student_noise * N(0, 1)",
        {"std": 1.0, "student_noise": 1.0},
        high_entropy_rows,
    ),
    RowGenerator(
        "label_smoothed",
        "p(label) ~ U(label_low, label_high), the rest (1 - p(label)) shared by the other "
        "classes in proportion to exp(spread * N(0, 1)) (label smoothing 0.1's optimum keeps "
        "0.9 and 0.1 / C each); t = log p, label uniform; z = t + student_noise * N(0, 1)",
        {"label_low": 0.6, "label_high": 0.9, "spread": 0.25, "student_noise": 1.0},
        label_smoothed_rows,
    ),
)


def tail_settings(topks: Sequence[int], tail_samples: int) -> list[Setting]:
    """Every tail model at each top-k, the sampled one with ``tail_samples`` draws."""
    return pool_settings(topks, [tail_samples])


def tail_mass(teacher: Tensor, labels: Tensor, topk: int) -> float | None:
    """Median mass (T = 1) outside the top-k and the label: what a tail model describes."""
    log_p = teacher.log_softmax(-1)
    known = torch.zeros_like(log_p, dtype=torch.bool)
    known.scatter_(-1, log_p.topk(min(topk, log_p.shape[-1]), -1).indices, True)
    known.scatter_(-1, labels.unsqueeze(-1), True)
    mass = log_p.exp().masked_fill(known, 0.0).sum(-1)
    return rounded(mass.median().item())


@one_thread()
def synthetic_populations(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict]]:
    """The synthetic populations' descriptions and their rows of figures."""
    described, results = {}, []
    settings = [DENSE, *tail_settings(args.population_topk, args.population_tail_samples)]
    for number, row_gen in enumerate(POPULATIONS):
        seed = args.seed + 200 + number
        made = make_rows(row_gen, args.population_rows, args.classes, seed, args.temperatures)
        described[row_gen.name] = {
            "rows": args.population_rows,
            "classes": args.classes,
            **made.info,
            "tail_mass_median": {
                str(k): tail_mass(made.teacher, made.labels, k) for k in args.population_topk
            },
        }
        draw_gen = torch.Generator().manual_seed(seed + 100)
        for setting in settings:
            stats = measure_setting(
                made.teacher, made.student, made.labels, setting, args.temperatures,
                made.references, args.draws, draw_gen,
            )  # fmt: skip
            results += [
                {
                    "population": row_gen.name,
                    **setting.describe(args.classes),
                    "temperature": t,
                    **figures,
                }
                for t, figures in stats.items()
            ]
    return described, results


def pool_population(args: argparse.Namespace, console: Console) -> tuple[dict[str, Any], list]:
    """The demo pool's outputs on ``POOL_SPLIT``, every ordered pair's rows together."""
    cfg = demo_config(args)
    info, specs = pretrain_pool(cfg, console)
    names = [member["name"] for member in info]
    logits, labels = eval_view_logits(specs, DemoLayout.of(cfg).data / POOL_SPLIT)
    classes = logits.shape[-1]
    settings = [DENSE, *tail_settings(args.population_topk, args.population_tail_samples)]
    with one_thread():
        pooled, _ = pair_errors(args, logits, labels, names, settings)
    teachers = logits.transpose(0, 1).reshape(-1, classes)
    described = {
        "rows": logits.shape[0] * len(names) * (len(names) - 1),
        "classes": classes,
        "source": f"{'DemoConfig.quick()' if args.quick else 'DemoConfig()'}: members "
        f"{', '.join(names)} on the digits' {POOL_SPLIT} split (eval view), every ordered "
        "(teacher, student) pair; labels the true digits",
        "entropy_nats": entropy_range(teachers),
        "tail_mass_median": {
            str(k): tail_mass(teachers, labels.repeat(len(names)), k) for k in args.population_topk
        },
        "note": (
            f"{classes} classes: top-k keeps k of {classes} (and the label), so k = 5 leaves 4 "
            f"or 5 tail classes and k >= {classes - 1} none, where every tail model reads the same "
            "exact target (only fp16 rounding is left); not the k of 1000 classes"
        ),
    }
    return described, [{"population": POOL, **row} for row in pooled]


def _worst(results: list[dict], tail: str, topk: int) -> tuple[float, list]:
    """The worst median gradient error of ``tail`` at ``topk`` over populations and the
    criterion's temperatures, and where it is."""
    rows = [
        r
        for r in results
        if r["tail"] == tail and r["topk"] == topk and r["temperature"] in CHOICE_TEMPERATURES
    ]
    if not rows:
        return math.inf, []
    worst = max(rows, key=lambda r: r["grad_rel_l2"]["median"])
    return worst["grad_rel_l2"]["median"], [worst["population"], worst["temperature"]]


def default_choice(results: list[dict]) -> dict[str, Any]:
    """The tail model docs/method.md's criterion picks from these figures, and why."""
    tails = [t.value for t in TailModel]
    by_tail = {
        tail: {f"k={k}": _worst(results, tail, k) for k in (CHOICE_TOPK, TIE_TOPK)}
        for tail in tails
    }
    best = min(by_tail[t][f"k={CHOICE_TOPK}"][0] for t in tails)
    close = [t for t in tails if by_tail[t][f"k={CHOICE_TOPK}"][0] <= best + TIE_MARGIN]
    # Ties by the same worst case at k = 5, then by fewer bytes (the sampled tail stores draws).
    chosen = min(
        close, key=lambda t: (by_tail[t][f"k={TIE_TOPK}"][0], t == TailModel.SAMPLED.value)
    )
    return {
        "criterion": (
            f"lowest worst case, over the populations and T in {list(CHOICE_TEMPERATURES)}, of "
            f"the median gradient error at k = {CHOICE_TOPK}; within {TIE_MARGIN:g}: the same "
            f"at k = {TIE_TOPK}, then fewer bytes (docs/method.md)"
        ),
        "worst_median_grad_rel_l2": {
            tail: {k: {"value": v, "at": at} for k, (v, at) in worst.items()}
            for tail, worst in by_tail.items()
        },
        "chosen": chosen,
    }


def populations_part(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Every tail model at each top-k and T on the four populations, and the default's choice."""
    populations, results = synthetic_populations(args)
    populations[POOL], pool_rows = pool_population(args, console)
    results += pool_rows
    return {
        "topk": args.population_topk,
        "tail_samples": args.population_tail_samples,
        "temperatures": args.temperatures,
        "populations": populations,
        "note": (
            "grad_rel_l2: per row, ||g - g_dense|| / ||g_dense||, g the gradient in the student's "
            "logits of the stored target's divergence as training reads it, g_dense the fp64 "
            "dense one; sampled: one draw set per row (mean_of_draws: the mean over --draws)"
        ),
        "results": results,
        "default_choice": default_choice(results),
    }
