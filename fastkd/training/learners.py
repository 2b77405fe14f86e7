"""The models a run trains: loaded and checked against the data, wrapped for DDP, optimised.

Models with the same preprocessing share an image stream: the view loader decodes each view once
per distinct data config (``ImageStreams``), and each model reads its own stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastkd.checkpoints import json_data_config
from fastkd.data import ImageDataset
from fastkd.errors import ConfigError
from fastkd.input_size import announce_input
from fastkd.models import LoadedModel, ModelSpec, load_model
from fastkd.runtime import DistContext, fast_memory_format
from fastkd.training.config import TrainConfig
from fastkd.training.steps import exploded_weights_error, weight_norm


@dataclass
class Learner:
    """A model being trained, with its optimiser and the image stream it reads."""

    name: str
    arch: str
    model: nn.Module  # unwrapped
    forward: nn.Module  # ``model`` or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    data_config: dict[str, Any]
    model_kwargs: dict[str, Any]
    stream: int  # which of the view loader's image streams it reads
    before: ModelSpec  # its weights before training, for the report
    start_norm: float = 0.0  # the L2 norm of its weights before training (exploding weights)
    own_start: bool = False  # no checkpoint given: ``before`` is the run's own initial weights

    def check_weights(self, epoch: int, state: Path) -> None:
        """Stop the run (``NonFiniteError``) before weights that are not finite or exploded
        after ``epoch`` are saved (``steps.exploded_weights_error``)."""
        norm = weight_norm(self.model)
        error = exploded_weights_error(self.name, norm, self.start_norm, epoch, state)
        if error is not None:
            raise error


class ImageStreams:
    """The distinct data configs a run's models read, in order of first use."""

    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []

    def index(self, data_config: Mapping[str, Any]) -> int:
        """The stream of ``data_config``, added on first use."""
        config = json_data_config(data_config)
        if config not in self.configs:
            self.configs.append(config)
        return self.configs.index(config)


def spec_text(spec: ModelSpec) -> str:
    """The ``alias:ARCH[=CKPT]`` text that parses back to ``spec`` (name kept)."""
    text = f"{spec.name}:{spec.arch}"
    return f"{text}={spec.checkpoint}" if spec.checkpoint is not None else text


def load_for(dataset: ImageDataset, data: Path, spec: ModelSpec, **kwargs: Any) -> LoadedModel:
    """Load ``spec`` (``load_model``'s keyword arguments, ``input_size`` among them), refusing a
    model whose classes are not the data set's; log its input size (warn if it upscales)."""
    loaded = load_model(spec, **kwargs)
    if loaded.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model {spec.name!r} ({spec.checkpoint or spec.arch}) has {loaded.num_classes} "
            f"classes, the data set {data} has {dataset.num_classes}"
        )
    announce_input(spec.name, loaded.data_config, loaded.input_source, dataset)
    return loaded


def check_labels(dataset: ImageDataset, data: Path) -> None:
    """Every label of the training data names one of its classes (the models' classes are
    checked against the data set's as they load): checked once, when the run is built, so no
    step checks labels on the device."""
    labels, classes = dataset.labels, dataset.num_classes
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise ConfigError(
            f"{data}: sample {dataset.keys[bad[0]]!r} has label {labels[bad[0]]}, outside the "
            f"data set's {classes} classes"
        )


def load_student(cfg: TrainConfig, dataset: ImageDataset) -> LoadedModel:
    """The student: a checkpoint, timm's pretrained weights, or a random init (from scratch)."""
    return load_for(
        dataset,
        cfg.data,
        ModelSpec.parse(cfg.student),
        num_classes=dataset.num_classes,
        pretrained=cfg.pretrained,
        model_kwargs=cfg.model_kwargs,
        input_size=cfg.input_size,
    )


def initial_weights_path(out_dir: Path, name: str) -> Path:
    """Where a student without a checkpoint (timm's pretrained weights or a random init) keeps
    its starting weights: the report's 'before' and the weight change's reference."""
    return out_dir / f"{name}.init.pt"


def make_learner(
    loaded: LoadedModel,
    cfg: TrainConfig,
    device: torch.device,
    dist: DistContext,
    streams: ImageStreams,
) -> Learner:
    """The model on ``device`` (in its fast layout there) in train mode, its DDP wrapper on
    several ranks, its optimiser."""
    model = loaded.model.to(device, memory_format=fast_memory_format(device)).train()
    forward: nn.Module = model
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    spec = loaded.spec
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, cfg.lr_for(spec.name))
    before = spec
    if spec.checkpoint is None:  # saved at the start (Trainer._save_initial_weights)
        before = ModelSpec(spec.arch, initial_weights_path(cfg.out_dir, spec.name), spec.name)
    return Learner(
        name=spec.name,
        arch=spec.arch,
        model=model,
        forward=forward,
        optimizer=optimizer,
        scheduler=None,
        data_config=json_data_config(loaded.data_config),
        model_kwargs=dict(loaded.model_kwargs),
        stream=streams.index(loaded.data_config),
        before=before,
        start_norm=weight_norm(model),
        own_start=spec.checkpoint is None,
    )


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """Adam or SGD at ``lr`` (default: the run's, ``cfg.learning_rate``) in their fused form,
    whose ``found_inf`` (a device tensor, as GradScaler sets it) skips a step on the device: no
    parameter, moment or step count changes, and the host never has to look at the loss before
    ``step()``.

    SGD's momentum buffers start as zeros: its first fused step would otherwise allocate them
    uninitialised and, if that step is skipped, keep the garbage (with zeros the first step
    computes buf = 0 * momentum + grad = grad, bit for bit what the lazy first step stores).
    """
    lr = cfg.learning_rate if lr is None else lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    optimizer = torch.optim.SGD(
        params,
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    if cfg.momentum:
        for param in params:
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """The optimiser as a CUDA graph replays it (``capturable``), or as an eager step runs it.

    In a graph the learning rate must be a device tensor: a number is frozen into the captured
    launch, so the schedule would stop applying; the schedule fills the tensor in place
    (``LambdaLR`` sets a tensor lr with ``fill_``). fp32, the dtype the fused CUDA kernels read
    it in. Adam's groups are marked capturable, which torch requires of a step it captures
    (its warning about eager capturable steps is muted: the warm-up and short batches are
    eager on purpose). Without graphs the lr is a number again; applied after a run state is
    loaded too, whichever way the state was saved.
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        if capturable and not isinstance(lr, torch.Tensor):
            device = group["params"][0].device
            group["lr"] = torch.tensor(lr, dtype=torch.float32, device=device)
        elif capturable and lr.device != group["params"][0].device:  # loaded on the host
            group["lr"] = lr.to(group["params"][0].device, torch.float32)
        elif not capturable and isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)  # one host read, at set-up
        if "capturable" in group:  # Adam's; fused SGD reads a tensor lr as it is
            group["capturable"] = capturable
    if capturable:
        optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]


def add_cosine_schedules(learners: list[Learner], total_steps: int) -> None:
    """Cosine decay of every learner's lr to 0 over the run's steps, per step."""
    total = max(1, total_steps)
    for learner in learners:
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(
            learner.optimizer,
            lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
        )
