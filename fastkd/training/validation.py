"""Model selection's figures: top-1 of the trained models on held-out data, shared by the ranks.

Every rank evaluates a disjoint, contiguous slice of the samples and the correct counts are
summed across ranks, so all ranks take part in the one collective (none waits alone in it while
another evaluates) and one process and N ranks get the same figures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from fastkd.data import ImageDataset
from fastkd.evaluation import evaluate
from fastkd.runtime import DistContext
from fastkd.training.config import TrainConfig
from fastkd.training.learners import Learner


def rank_slice(num_samples: int, dist_context: DistContext) -> np.ndarray:
    """This rank's samples: a contiguous slice, disjoint from the others' (maybe empty)."""
    return np.array_split(np.arange(num_samples), dist_context.world_size)[dist_context.rank]


def top1(
    learners: list[Learner],
    dataset: ImageDataset,
    cfg: TrainConfig,
    device: torch.device,
    dist_context: DistContext,
) -> dict[str, float]:
    """Top-1 (%) of each learner's model on ``dataset``, the same on every rank; the models are
    left in train mode."""
    samples = rank_slice(len(dataset), dist_context)
    correct = np.zeros(len(learners), dtype=np.int64)
    if samples.size:
        predictions = evaluate(
            {learner.name: learner.model for learner in learners},
            {learner.name: learner.data_config for learner in learners},
            dataset,
            batch_size=cfg.batch_size,
            device=device,
            backend=cfg.backend,
            amp=cfg.amp,
            samples=samples,
        )
        labels = dataset.labels[samples]
        correct = np.array([(predictions[m.name] == labels).sum() for m in learners])
    if dist_context.enabled:
        counts = torch.from_numpy(correct).to(device)
        dist.all_reduce(counts)
        correct = counts.cpu().numpy()
    for learner in learners:
        learner.model.train()
    total = len(dataset)
    return {m.name: 100.0 * (int(c) / total) for m, c in zip(learners, correct, strict=True)}
