"""The benchmarks' model pools: random-init timm models saved as fastkd checkpoints.

Throughput does not depend on the weights, and no pretrained weights can be downloaded here, so a
benchmark pool is timm's architectures with random weights, each saved with timm's own data
config for it (interpolation, mean, std, crop) at the benchmark's input size. A ``--pool`` entry
``NAME=CKPT`` (or ``alias:NAME=CKPT``) names a checkpoint of one's own instead and is used as it
is. One home for the benchmarks' pools: ``bench dump`` and ``bench train`` both build theirs here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config

from fastkd.checkpoints import json_data_config, save_checkpoint
from fastkd.errors import ConfigError

GPU_POOL = ("resnet50", "convnext_tiny", "vit_small_patch16_224")  # ImageNet's usual trio, 224 px
CPU_POOL = ("test_resnet", "test_convnext", "test_vit")  # timm's test models: minutes on 2 cores
CPU_INPUT_SIZE = 128  # px: the CPU pool's input side


def parse_pool(text: str | None, on_gpu: bool) -> list[str]:
    """``--pool a,b,c`` (or the device's default) -> its entries, each checked."""
    entries = [entry.strip() for entry in (text or "").split(",") if entry.strip()]
    if not entries:
        return list(GPU_POOL if on_gpu else CPU_POOL)
    for entry in entries:
        arch = entry.split(":", 1)[-1].split("=", 1)[0]
        if "=" not in entry and not timm.is_model(arch):
            raise ConfigError(
                f"--pool {entry!r}: timm has no architecture {arch!r} (give NAME or NAME=CKPT)"
            )
    return entries


def model_specs(
    entries: list[str],
    folder: Path,
    num_classes: int,
    input_size: int | None,
    seed: int = 0,
) -> list[str]:
    """``--model`` specs of the pool: ``NAME=CKPT`` entries as given; each bare NAME a random-init
    model saved in ``folder`` with timm's data config at ``input_size`` (default: timm's).
    Aliases keep repeated architectures apart (``resnet50``, ``resnet50-2``, ...)."""
    specs, seen = [], {}
    for index, entry in enumerate(entries):
        if "=" in entry:
            specs.append(entry)
            continue
        arch = entry.split(":", 1)[-1]
        seen[arch] = seen.get(arch, 0) + 1
        alias = entry.split(":", 1)[0] if ":" in entry else arch
        if ":" not in entry and seen[arch] > 1:
            alias = f"{arch}-{seen[arch]}"
        specs.append(
            f"{alias}:{arch}={random_checkpoint(folder / f'{alias}.pt', arch, num_classes, input_size, seed + index)}"
        )
    return specs


def random_checkpoint(
    path: Path, arch: str, num_classes: int, input_size: int | None, seed: int
) -> Path:
    """A random-init ``arch`` with ``num_classes`` outputs, saved as a fastkd checkpoint whose
    data config is timm's for the architecture, at ``input_size`` px when given (vision
    transformers are built for that size, so their position embeddings fit it)."""
    kwargs: dict = {"num_classes": num_classes}
    torch.manual_seed(seed)
    model = timm.create_model(arch, **kwargs)
    config = json_data_config(resolve_model_data_config(model))
    if input_size is not None and list(config["input_size"][1:]) != [input_size, input_size]:
        if _takes_img_size(model):
            kwargs["img_size"] = input_size
            torch.manual_seed(seed)
            model = timm.create_model(arch, **kwargs)
        config["input_size"] = [3, input_size, input_size]
    return save_checkpoint(path, model, arch, kwargs, config)


def _takes_img_size(model: torch.nn.Module) -> bool:
    """Whether the model's class is built for a given image size (vision transformers and kin)."""
    return "img_size" in inspect.signature(type(model).__init__).parameters
