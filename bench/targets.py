"""Faithfulness of compressed soft targets: each tail model against the dense teacher.

The reference of a row is the dense KL(softmax(t / T) || softmax(z / T)) of the teacher's fp64
logits t and the student's fp64 logits z, and its gradient in z (autograd). Each compressed
target is made as a store keeps it (``PoolTargets.from_logits``: fp16 log-probabilities, the
tail's two fp32 masses, the sampled tail's draws) and read by ``PoolTargets.divergence``, the
reference the kernel re-implements. Per row: the KL's relative error, the gradient's relative L2
error and its cosine with the dense gradient (gradients of the KL itself: the loss's T^2 cancels
in both). The stored dense target (fp16 log-probabilities) is measured too: the floor any
sparse target sits on.

* synthetic: 1000-class rows from two generators (``GENERATORS``: a ranked one whose entropy
  spans confident to uncertain, and a pessimistic Gaussian one), every tail model at equal raw
  bytes per stored view (``raw_bytes_per_view``; at most the budget): uniform and bucket keep the
  same top-k, the sampled tail trades top-k classes for draws (every split that fills it). The sampled
  tail is random: one draw per row is the main figure, the mean of ``--draws`` draws (as the
  stored views and epochs average it) a second one.
* pool: the logits of the demo's trained pool (``fastkd.demo``; 10 classes) on the digits' eval
  view, every ordered (teacher, student) pair, top-k 1..5.
* transfer: the demo run end to end with dense targets and with top-3 sparse targets under each
  tail model; each sparse run's test top-1 against the dense run's, paired by (arm, seed,
  member).

Run: ``python -m fastkd.bench.targets`` (``--quick``: fewer rows, the quick pool, no transfer);
results go to ``bench/results/targets-cpu.json`` (fp64 on the CPU, whatever the host has).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import Tensor

from fastkd.compression import DEFAULT_TAIL, TailModel, id_bytes, raw_bytes_per_view
from fastkd.data import open_dataset
from fastkd.demo.config import ARMS, PREDICTIONS_FILE, DemoConfig, DemoLayout
from fastkd.demo.predictions import FoldPredictions
from fastkd.demo.run import pretrain_pool, run_demo
from fastkd.evaluation import eval_view_outputs
from fastkd.kernels import PoolTargets
from fastkd.models import load_model, parse_pool
from fastkd.runtime import machine_name
from fastkd.training import HISTORY_FILE

RESULTS = Path(__file__).resolve().parent / "results" / "targets-cpu.json"
PARTS = ("synthetic", "pool", "transfer")
# A sparse view's fixed bytes (true_logprob, log_tail, log_tail_sqrt): one class's row less one class.
FIXED_BYTES = raw_bytes_per_view(1000, 1, TailModel.BUCKET, 0) - (2 + id_bytes(1000))
# The demo's arms that read the stored targets (fastkd.demo.config.ARMS, by name).
KD_ARMS = ("plain", "best", "kl_dp", "bikd", "kl_dp_free")
DIGITS_CLASSES = 10

# -- targets and their errors -------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What is stored of a teacher's row: dense (fp16) or a top-k with a tail model."""

    tail: str  # "dense" or a TailModel value
    topk: int = 0
    tail_samples: int = 0

    @property
    def label(self) -> str:
        if self.tail == "dense":
            return "dense"
        draws = f"+{self.tail_samples}" if self.tail == TailModel.SAMPLED.value else ""
        return f"{self.tail} k={self.topk}{draws}"

    def bytes_per_view(self, num_classes: int) -> int:
        tail = DEFAULT_TAIL if self.tail == "dense" else TailModel(self.tail)
        return raw_bytes_per_view(num_classes, self.topk, tail, self.tail_samples)

    def describe(self, num_classes: int) -> dict[str, Any]:
        return {
            "tail": self.tail,
            "topk": self.topk,
            "tail_samples": self.tail_samples,
            "bytes": self.bytes_per_view(num_classes),
        }


DENSE = Setting("dense")


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


def dense_kl(teacher: Tensor, student: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """[B] KL(softmax(t / T) || softmax(z / T)) of fp64 logits and its gradient in z [B, C]."""
    z = student.detach().clone().requires_grad_()
    log_p = (teacher / temperature).log_softmax(-1)
    log_q = (z / temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


def stored_kl(
    targets: PoolTargets, labels: Tensor, student: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """[B] the stored target's divergence (member 0) and its gradient in the fp64 student [B, C]."""
    z = student.detach().clone().requires_grad_()
    member = torch.zeros(z.shape[0], dtype=torch.long)
    kl = targets.divergence(member, labels, z, temperature)
    (grad,) = torch.autograd.grad(kl.sum(), z)
    return kl.detach(), grad


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the error math: these are figures, not timings, and the rows are
    small, where two threads on a shared two-core host wait on each other (many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _round(value: float) -> float | None:
    return None if not math.isfinite(value) else float(f"{value:.4g}")


def _quantile(values: Tensor, q: float) -> float | None:
    finite = values[torch.isfinite(values)]
    return _round(torch.quantile(finite, q).item()) if finite.numel() else None


def error_stats(kl: Tensor, grad: Tensor, ref_kl: Tensor, ref_grad: Tensor) -> dict[str, Any]:
    """Per-row errors against the dense reference, as median and tail quantile (the bad end:
    p90 of the errors, p10 of the cosine), and the totals over the rows (errors weighted by the
    rows' KL and gradient sizes, as a batch's loss weights them)."""
    ref_norm = ref_grad.norm(dim=-1)
    kl_error = (kl - ref_kl).abs() / ref_kl
    grad_error = (grad - ref_grad).norm(dim=-1) / ref_norm
    cosine = (grad * ref_grad).sum(-1) / (grad.norm(dim=-1) * ref_norm)
    return {
        "kl_rel_error": {"median": _quantile(kl_error, 0.5), "p90": _quantile(kl_error, 0.9)},
        "grad_rel_l2": {"median": _quantile(grad_error, 0.5), "p90": _quantile(grad_error, 0.9)},
        "grad_cosine": {"median": _quantile(cosine, 0.5), "p10": _quantile(cosine, 0.1)},
        "kl_rel_error_total": _round(((kl - ref_kl).abs().sum() / ref_kl.sum()).item()),
        "grad_rel_l2_total": _round(((grad - ref_grad).norm() / ref_grad.norm()).item()),
        "kl_signed_rel_error_median": _quantile((kl - ref_kl) / ref_kl, 0.5),
    }


def measure_setting(
    teacher: Tensor,
    student: Tensor,
    labels: Tensor,
    setting: Setting,
    temperatures: Sequence[float],
    references: dict[float, tuple[Tensor, Tensor]],
    draws: int,
    generator: torch.Generator,
) -> dict[float, dict[str, Any]]:
    """Error statistics of one setting at each temperature; for the sampled tail those of one
    draw per row and, in ``mean_of_draws``, of the mean KL and gradient over ``draws`` draws."""
    count = draws if setting.tail == TailModel.SAMPLED.value else 1
    pool = teacher.unsqueeze(1)
    made = [
        PoolTargets.from_logits(
            pool,
            labels,
            setting.topk,
            DEFAULT_TAIL if setting.tail == "dense" else setting.tail,
            setting.tail_samples,
            generator,
        )
        for _ in range(count)
    ]
    out = {}
    for temperature in temperatures:
        ref_kl, ref_grad = references[temperature]
        measured = [stored_kl(targets, labels, student, temperature) for targets in made]
        stats = error_stats(*measured[0], ref_kl, ref_grad)
        if count > 1:
            mean_kl = torch.stack([kl for kl, _ in measured]).mean(0)
            mean_grad = torch.stack([grad for _, grad in measured]).mean(0)
            stats["mean_of_draws"] = {
                "draws": count,
                **error_stats(mean_kl, mean_grad, ref_kl, ref_grad),
            }
        out[temperature] = stats
    return out


def entropy_range(teacher: Tensor) -> dict[str, float | None]:
    """Min / median / max of the rows' entropy at T = 1, in nats."""
    log_p = teacher.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return {
        "min": _round(entropy.min().item()),
        "median": _quantile(entropy, 0.5),
        "max": _round(entropy.max().item()),
    }


# -- (a) synthetic rows -------------------------------------------------------------------------


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


@one_thread()
def synthetic_part(args: argparse.Namespace) -> dict[str, Any]:
    """Every budget's settings (and the stored dense floor) on each generator's rows."""
    generators, results, best = {}, [], []
    for number, row_gen in enumerate(GENERATORS):
        gen = torch.Generator().manual_seed(args.seed + number)
        teacher, student, labels = row_gen.make(args.rows, args.classes, gen, row_gen.params)
        generators[row_gen.name] = {
            "formula": row_gen.formula,
            "params": row_gen.params,
            "seed": args.seed + number,
            "entropy_nats": entropy_range(teacher),
            "label_is_teacher_argmax": _round(
                (teacher.argmax(-1) == labels).double().mean().item()
            ),
        }
        references = {t: dense_kl(teacher, student, t) for t in args.temperatures}
        generators[row_gen.name]["dense_kl_median"] = {
            str(t): _quantile(references[t][0], 0.5) for t in args.temperatures
        }
        draw_gen = torch.Generator().manual_seed(args.seed + 100 + number)
        budgets = [(None, DENSE)] + [
            (budget, s) for budget in args.budgets for s in budget_settings(budget, args.classes)
        ]
        for budget, setting in budgets:
            stats = measure_setting(
                teacher, student, labels, setting, args.temperatures, references, args.draws,
                draw_gen,
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


# -- (b) the demo's pool ------------------------------------------------------------------------


def demo_config(args: argparse.Namespace, **overrides: Any) -> DemoConfig:
    """The demo configuration this benchmark trains or reuses under ``--cache``."""
    settings: dict[str, Any] = {"out_dir": args.cache, "progress": False, **overrides}
    return DemoConfig.quick(**settings) if args.quick else DemoConfig(**settings)


@torch.no_grad()
def eval_view_logits(specs: Sequence[str], data: Path) -> tuple[Tensor, Tensor]:
    """fp64 logits [N, M, C] of every pool member on the eval view (view 0, each model's own
    crop and preprocessing, as ``fastkd.evaluation`` runs them) of a split, and its labels [N]."""
    dataset = open_dataset(data)
    members = {spec.name: load_model(spec) for spec in parse_pool(specs)}
    logits = eval_view_outputs(
        {name: member.model for name, member in members.items()},
        {name: member.data_config for name, member in members.items()},
        dataset,
        lambda z: z.double(),
        backend="torch",
        num_workers=0,
    )
    per_model = [torch.from_numpy(logits[name]) for name in members]
    return torch.stack(per_model, 1), torch.from_numpy(dataset.labels).long()


def pool_settings(topks: Sequence[int], samples: Sequence[int]) -> list[Setting]:
    out = []
    for topk in topks:
        out += [Setting(TailModel.UNIFORM.value, topk), Setting(TailModel.BUCKET.value, topk)]
        out += [Setting(TailModel.SAMPLED.value, topk, s) for s in samples]
    return out


def pool_part(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Every ordered (teacher, student) pair of the demo's trained pool, on each split."""
    cfg = demo_config(args)
    start = time.perf_counter()
    info, specs = pretrain_pool(cfg, console)
    pretrain_s = time.perf_counter() - start
    names = [member["name"] for member in info]
    settings = [DENSE, *pool_settings(args.pool_topk, args.pool_tail_samples)]
    splits, pooled, pairs = {}, [], []
    with one_thread():
        for split in args.pool_splits:
            logits, labels = eval_view_logits(specs, DemoLayout.of(cfg).data / split)
            splits[split] = {
                "images": logits.shape[0],
                "top1": {
                    name: _round((logits[:, m].argmax(-1) == labels).double().mean().item())
                    for m, name in enumerate(names)
                },
                "entropy_nats": {name: entropy_range(logits[:, m]) for m, name in enumerate(names)},
            }
            split_pooled, split_pairs = pair_errors(args, logits, labels, names, settings)
            pooled += [{"split": split, **row} for row in split_pooled]
            if split in args.pairs_splits:
                pairs += [{"split": split, **row} for row in split_pairs]
    return {
        "config": "DemoConfig.quick()" if args.quick else "DemoConfig()",
        "pool_seed": cfg.pool_seed,
        "pool": info,
        "pretrain_seconds": round(pretrain_s, 1),
        "view": "eval view (view 0): each model's crop_pct and preprocessing, no flip",
        "splits": splits,
        "note": (
            "all_pairs: every ordered (teacher, student) pair's rows together; pairs: each one "
            f"(splits {', '.join(args.pairs_splits)}); labels are the true digits (kept exactly "
            "by every target); pretrain_seconds: this invocation's (a pool trained before under "
            "--cache is reused)"
        ),
        "all_pairs": pooled,
        "pairs": pairs,
    }


def pair_errors(
    args: argparse.Namespace,
    logits: Tensor,
    labels: Tensor,
    names: Sequence[str],
    settings: Sequence[Setting],
) -> tuple[list[dict], list[dict]]:
    """Error statistics of each setting and T over all ordered pairs' rows together, and per
    pair; member t's logits [N, M, C] teach member s's."""
    num_classes = logits.shape[-1]
    pairs = [(t, s) for t in range(len(names)) for s in range(len(names)) if t != s]
    collected: dict[tuple[Setting, float], list[tuple[Tensor, ...]]] = {}
    per_pair = []
    for number, (t, s) in enumerate(pairs):
        teacher, student = logits[:, t], logits[:, s]
        references = {temp: dense_kl(teacher, student, temp) for temp in args.temperatures}
        for setting in settings:
            gen = torch.Generator().manual_seed(args.seed + 1000 + number)
            targets = PoolTargets.from_logits(
                teacher.unsqueeze(1),
                labels,
                setting.topk,
                DEFAULT_TAIL if setting.tail == "dense" else setting.tail,
                setting.tail_samples,
                gen,
            )
            for temp in args.temperatures:
                kl, grad = stored_kl(targets, labels, student, temp)
                collected.setdefault((setting, temp), []).append((kl, grad, *references[temp]))
                per_pair.append(
                    {
                        "teacher": names[t],
                        "student": names[s],
                        **setting.describe(num_classes),
                        "temperature": temp,
                        **error_stats(kl, grad, *references[temp]),
                    }
                )
    pooled = []
    for (setting, temp), rows in collected.items():
        merged = [torch.cat(parts) for parts in zip(*rows, strict=True)]
        pooled.append(
            {
                "pairs": len(rows),
                **setting.describe(num_classes),
                "temperature": temp,
                **error_stats(*merged),
            }
        )
    return pooled, per_pair


# -- (c) the demo's transfer, end to end --------------------------------------------------------


def transfer_settings(samples: int) -> list[Setting]:
    return [
        DENSE,
        Setting(TailModel.UNIFORM.value, 3),
        Setting(TailModel.BUCKET.value, 3),
        Setting(TailModel.SAMPLED.value, 3, samples),
    ]


Key = tuple[str, int, int, str]  # (arm, fold, seed, member)


def _runs(cfg: DemoConfig) -> dict[tuple[str, int, int], Path]:
    """Each transfer run's folder, per (arm, fold, seed)."""
    return {
        (arm.name, fold, seed): DemoLayout.of(cfg, fold).transfer(seed, arm.name)
        for arm in ARMS
        for fold in cfg.run_folds
        for seed in cfg.seeds
    }


def _top1_after(cfg: DemoConfig, members: Sequence[str]) -> dict[Key, float]:
    """Test top-1 of every member after each transfer run, from the run's saved predictions."""
    out = {}
    for (arm, fold, seed), run in _runs(cfg).items():
        found = FoldPredictions.from_dict(json.loads((run / PREDICTIONS_FILE).read_text()))
        for member in members:
            out[(arm, fold, seed, member)] = 100.0 * float(found.correct(member).mean())
    return out


def _histories(cfg: DemoConfig, members: Sequence[str]) -> dict[Key, list[dict]]:
    """Each transfer run's epoch records (``fastkd.training``'s history), per (arm, fold, seed,
    member); a joint run keeps one history for the whole pool."""
    out = {}
    for (arm, fold, seed), run in _runs(cfg).items():
        for member in members:
            path = run / member / HISTORY_FILE
            out[(arm, fold, seed, member)] = json.loads(
                (path if path.is_file() else run / HISTORY_FILE).read_text()
            )
    return out


def _finished(cfg: DemoConfig) -> bool:
    """Whether every transfer run of ``cfg`` is already finished under its cache folder (then
    ``run_demo`` reads the runs back instead of training them)."""
    return all((run / PREDICTIONS_FILE).is_file() for run in _runs(cfg).values())


def _change(
    figures: dict[Key, float],
    dense: dict[Key, float],
    arms: Sequence[str],
) -> dict[str, Any]:
    """Top-1 after transfer minus the dense run's, paired by (arm, fold, seed, member): the mean
    (and its sample std) over the pairs of ``arms``, and per member."""
    diffs = {key: figures[key] - dense[key] for key in figures if key[0] in arms}
    values = list(diffs.values())
    members = sorted({key[-1] for key in diffs})
    return {
        "mean": _round(float(np.mean(values))),
        "std": _round(float(np.std(values, ddof=1))) if len(values) > 1 else None,
        "pairs": len(values),
        "per_member": {
            m: _round(float(np.mean([d for k, d in diffs.items() if k[-1] == m]))) for m in members
        },
    }


def transfer_part(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The demo once per stored-target setting; each sparse run's test top-1 minus the dense
    run's, paired by (arm, seed, member)."""
    runs: dict[str, dict[str, Any]] = {}
    after: dict[str, dict[Key, float]] = {}
    history: dict[str, dict[Key, list[float]]] = {}  # val top-1 per epoch
    base = demo_config(args, seeds=tuple(args.transfer_seeds))
    quiet = Console(file=io.StringIO())
    arms: list[str] = []
    for setting in transfer_settings(args.transfer_tail_samples):
        cfg = replace(
            base,
            topk=setting.topk,
            tail=None if setting.tail == "dense" else setting.tail,
            tail_samples=setting.tail_samples or base.tail_samples,
        )
        console.print(f"transfer with {setting.label} targets")
        reused = _finished(cfg)
        start = time.perf_counter()
        report = run_demo(cfg, quiet)
        arms = report.arms
        after[setting.label] = _top1_after(cfg, report.members)
        records = _histories(cfg, report.members)
        history[setting.label] = {
            key: [r["val_top1"].get(key[-1]) for r in epochs] for key, epochs in records.items()
        }
        histories = {run / HISTORY_FILE for run in _runs(cfg).values()}  # joint runs
        histories |= {run / m / HISTORY_FILE for run in _runs(cfg).values() for m in report.members}
        summary = report.summary
        runs[setting.label] = {
            **setting.describe(DIGITS_CLASSES),
            "store": DemoLayout.of(cfg).relative(DemoLayout.of(cfg).store),
            "seconds": round(time.perf_counter() - start, 1),
            "reused_finished_runs": reused,
            "training_seconds": round(
                sum(
                    r["seconds"]
                    for path in histories
                    if path.is_file()
                    for r in json.loads(path.read_text())
                ),
                1,
            ),
            "pool_delta": {
                arm: _round(stat["pool_delta"]["estimate"]) for arm, stat in summary["arms"].items()
            },
            "top1_after": {
                arm: {m: _round(stat["members"][m]["top1_after"]) for m in report.members}
                for arm, stat in summary["arms"].items()
            },
            "top1_before": {m: _round(v) for m, v in summary["top1_before"].items()},
        }
    dense = after[DENSE.label]
    for label, figures in after.items():
        if label != DENSE.label:
            runs[label]["top1_change_vs_dense"] = {
                **{arm: _change(figures, dense, [arm]) for arm in arms},
                "kd_arms": _change(figures, dense, KD_ARMS),
            }
            epochs = [
                (a != b, key[0])
                for key, values in history[label].items()
                for a, b in zip(values, history[DENSE.label][key], strict=True)
            ]
            runs[label]["val_top1_epochs_unlike_dense"] = {
                arm: [sum(d for d, a in epochs if a == arm), sum(a == arm for _, a in epochs)]
                for arm in arms
            }
    return {
        "config": ("DemoConfig.quick" if args.quick else "DemoConfig")
        + f"(seeds={tuple(args.transfer_seeds)})",
        "demo_config": base.to_dict(),
        "seeds": {"transfer": list(base.seeds), "pool_and_store_views": base.pool_seed},
        "note": (
            "top-1 in % of the test images of the folds run (one fold's image is about 0.28 "
            "points); top1_after: per arm and member, over those images, mean over seeds; "
            "top1_change_vs_dense: this run's top-1 after transfer minus the dense run's, paired "
            "by (fold, seed, member), per arm and over the KD "
            "arms (plain, best, kl_dp, bikd, kl_dp_free); the ce and joint arms read no stored "
            "targets, so their change shows the runs' own noise. At 10 classes a dense view is 24 raw bytes, as many as top-3 "
            "sparse: this part shows what each tail does to training, not a saving. "
            "val_top1_epochs_unlike_dense: per arm, [epochs whose val top-1 differs from the "
            "dense run's, epochs] over (fold, seed, member): whether the training itself changed. "
            "seconds: this invocation's; reused_finished_runs: the runs were trained by an earlier "
            "invocation with the same settings under --cache and read back; training_seconds: "
            "the transfer runs' epochs as their histories record them (when they were trained)"
        ),
        "runs": runs,
    }


# -- entry point --------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m fastkd.bench.targets", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="synthetic,pool,transfer")
    parser.add_argument("--quick", action="store_true", help="fewer rows, quick pool, no transfer")
    parser.add_argument("--rows", type=int, default=None, help="synthetic rows (2048; quick 256)")
    parser.add_argument("--classes", type=int, default=1000, help="synthetic classes")
    parser.add_argument("--budgets", type=_ints, default=[24, 48], help="raw bytes per view")
    parser.add_argument("--temperatures", type=_floats, default=[1.0, 2.0, 4.0])
    parser.add_argument("--draws", type=int, default=8, help="sampled-tail draws averaged")
    parser.add_argument("--pool-topk", type=_ints, default=[1, 2, 3, 4, 5])
    parser.add_argument("--pool-tail-samples", type=_ints, default=[2, 4])
    parser.add_argument("--pool-splits", default="train,val", help="digits splits")
    parser.add_argument(
        "--pairs-splits", default="train", help="splits whose per-pair rows are written"
    )
    parser.add_argument("--transfer-seeds", type=_ints, default=[0])
    parser.add_argument("--transfer-tail-samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("runs/bench-targets"), help="demo pool, stores, runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if args.quick:
        args.parts = [p for p in args.parts if p != "transfer"]
    if args.rows is None:
        args.rows = 256 if args.quick else 2048
    args.pool_splits = [s for s in args.pool_splits.split(",") if s]
    args.pairs_splits = [s for s in args.pairs_splits.split(",") if s]
    if args.draws < 1 or args.rows < 1:
        parser.error("--draws and --rows must be >= 1")
    return args


def _summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline figures: median / p90 gradient error per setting at T = 1 and 2."""
    lines = []
    for r in result.get("synthetic", {}).get("results", []):
        if r["temperature"] in (1.0, 2.0):
            g = r["grad_rel_l2"]
            lines.append(
                f"{r['generator']:8s} {r['budget_bytes'] or '-':>4} B  "
                f"{Setting(r['tail'], r['topk'], r['tail_samples']).label:18s} "
                f"T={r['temperature']:g}  grad err median {g['median']:.3g} p90 {g['p90']:.3g}"
            )
    for r in result.get("pool", {}).get("all_pairs", []):
        if r["temperature"] in (1.0, 2.0) and r["topk"] in (0, 3):
            g = r["grad_rel_l2"]
            lines.append(
                f"pool {r['split']:5s} {r['bytes']:>3} B  "
                f"{Setting(r['tail'], r['topk'], r['tail_samples']).label:18s} "
                f"T={r['temperature']:g}  grad err median {g['median']:.3g} p90 {g['p90']:.3g}"
            )
    for label, run in result.get("transfer", {}).get("runs", {}).items():
        change = run.get("top1_change_vs_dense", {}).get("kd_arms")
        if change:
            lines.append(f"transfer {label}: KD arms' top-1 vs dense {change['mean']:+.2f} points")
    return lines


TABLES = ("results", "all_pairs", "pairs")  # lists of result rows: one row a line in the JSON


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: the JSON stays standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def format_json(value: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with anything that fits in ``width`` characters on one line, and the rows of the
    result tables one a line (readable, and a diff shows which rows changed)."""
    flat = json.dumps(value, allow_nan=False)
    if len(flat) + indent <= width or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [
            f"{pad}{json.dumps(k)}: "
            + (
                "[\n"
                + ",\n".join(f"{pad}  {json.dumps(row, allow_nan=False)}" for row in v)
                + f"\n{pad}]"
                if k in TABLES and isinstance(v, list) and v
                else format_json(v, indent + 2, width)
            )
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{format_json(v, indent + 2, width)}" for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    result: dict[str, Any] = {
        "benchmark": "compressed soft targets vs the dense teacher: KL and gradient errors",
        "machine": machine_name("cpu"),  # fp64 reference math on the CPU
        "platform": platform.platform(),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "statistics": (
            "per row: kl_rel_error |kl - kl_dense| / kl_dense, grad_rel_l2 ||g - g_dense|| / "
            "||g_dense||, grad_cosine; median and p90 (cosine: p10, its bad end) over rows; "
            "*_total: the same summed over all rows; bytes: raw bytes per stored view"
        ),
    }
    seconds = {}
    for part, run in (
        ("synthetic", lambda: synthetic_part(args)),
        ("pool", lambda: pool_part(args, console)),
        ("transfer", lambda: transfer_part(args, console)),
    ):
        if part in args.parts:
            console.rule(f"[bold]{part}")
            start = time.perf_counter()
            result[part] = run()
            seconds[part] = round(time.perf_counter() - start, 1)
    result["seconds"] = seconds
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_json(finite(result)) + "\n")
    for line in _summary_lines(result):
        console.print(line, highlight=False)
    console.print(f"-> {args.out}")
    return result


if __name__ == "__main__":
    main()
