"""``fastkd bench targets``'s pool part: the demo's trained pool teaching each other.

The logits of the demo's pool (``fastkd.demo``; 10 classes) on the digits' eval view, every
ordered (teacher, student) pair, top-k 1..5 under each tail model; the demo configuration the
benchmark trains or reuses under ``--cache`` (``demo_config``) serves the transfer part too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor

from fastkd.bench.target_errors import (
    DENSE,
    Setting,
    dense_kl,
    entropy_range,
    error_stats,
    one_thread,
    rounded,
    stored_kl,
)
from fastkd.compression import DEFAULT_TAIL, TailModel
from fastkd.data import open_dataset
from fastkd.demo.config import DemoConfig, DemoLayout
from fastkd.demo.run import pretrain_pool
from fastkd.evaluation import eval_view_outputs
from fastkd.kernels import PoolTargets
from fastkd.models import load_model, parse_pool


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
                    name: rounded((logits[:, m].argmax(-1) == labels).double().mean().item())
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
