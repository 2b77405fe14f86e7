"""Pool members as timm models, from their specs (``fastkd.model_specs``) and weights files.

A model is a timm architecture plus weights: timm's pretrained weights (the user is online), a
fastkd checkpoint (``save_checkpoint``: arch, constructor kwargs, weights and the timm data config
it was trained with) or a plain timm/torch state dict. Every loaded model carries the sha256 of
its weights and its preprocessing as a JSON-able timm data config, so a store built from it can
later refuse a training run that would pair its targets with other weights or other pixels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

from fastkd.architectures import register as register_architectures
from fastkd.checkpoints import (
    check_model_kwargs,
    is_fastkd_checkpoint,
    json_data_config,
    plain_state_dict,
    read_checkpoint,
)
from fastkd.errors import (
    CheckpointError,
    ConfigError,
    WeightsUnavailableError,
    find_cause,
    is_disk_full,
)
from fastkd.input_size import CHECKPOINT_SOURCE, OVERRIDE_SOURCE, TIMM_SOURCE, with_input_size
from fastkd.model_specs import ModelSpec
from fastkd.model_specs import parse_pool as parse_pool  # re-exported: callers import it here
from fastkd.pretrained import hub_access, offline_hub

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20
MAX_HEAD_WEIGHTS = 1 << 31  # a fresh classifier larger than this (8 GiB in fp32) is refused
_SHOWN_KEYS = 5  # mismatched state-dict keys named in an error


@dataclass
class LoadedModel:
    """A pool member ready for inference (eval mode, on CPU)."""

    spec: ModelSpec
    model: torch.nn.Module
    data_config: dict[str, Any]  # timm's resolved data config, JSON-able (lists, not tuples)
    sha256: str  # of the checkpoint file; of the state dict for timm's pretrained weights
    num_classes: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_source: str = TIMM_SOURCE  # where data_config's input size came from (log lines)
    replaced_head: int | None = None  # the checkpoint's class count, when a fresh head replaced it


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _classifier_rows(arch: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a plain state dict, read from the weight of timm's classifier."""
    classifier = timm.models.get_pretrained_cfg_value(arch, "classifier") or "fc"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and weight.dim() >= 1:
            return int(weight.shape[0])
    return None


def _check_fits(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, path: Path
) -> None:
    """Refuse a state dict that does not fit the architecture, naming the first mismatches."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(tensor.shape)
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:_SHOWN_KEYS])}"
        + (", ..." if len(keys) > _SHOWN_KEYS else "")
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (checkpoint vs model)", reshaped),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit architecture {arch!r}: " + "; ".join(problems)
        )


def _create_pretrained(spec: ModelSpec, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """timm's model with its pretrained weights. Cached weights load with the hub offline; not
    cached and no hub within reach (``pretrained.hub_access``: a second or two), the load fails
    at once instead of after a minute of retries. A failed download (the hub's and urllib's
    OSErrors: no network) or weights timm does not have become one ``WeightsUnavailableError``
    saying what to pass instead; a full disk stays the OSError it is (the CLI names the path)."""
    access = hub_access(spec.arch)
    if access.unreachable:  # not cached, no hub: a URL download would wait on its own timeouts
        raise _not_downloadable(spec, access.reason)
    try:
        with offline_hub(access.offline):
            return timm.create_model(spec.arch, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as error:
        if find_cause(error, OSError, is_disk_full) is not None:
            raise
        if isinstance(error, OSError):
            raise _not_downloadable(spec, _root_cause(error)) from error
        raise WeightsUnavailableError(  # timm has no such weights, or they do not fit
            f"model {spec.name!r}: timm cannot load pretrained weights for {spec.arch!r} "
            f"({_root_cause(error)}). Give a weights file, {spec.arch}=CKPT, or start a student "
            "from a random init (--from-scratch)"
        ) from error


def _not_downloadable(spec: ModelSpec, cause: str) -> WeightsUnavailableError:
    """The one line for pretrained weights that cannot be had here, and what to pass instead."""
    return WeightsUnavailableError(
        f"model {spec.name!r}: timm's pretrained weights for {spec.arch!r} could not be "
        f"downloaded ({cause}). Without network, give a local weights file instead, "
        f"{spec.arch}=CKPT (a fastkd, timm or plain state-dict checkpoint), or copy a Hugging "
        "Face cache that holds them (HF_HOME) from a machine with network"
    )


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain on one line, without timm's Python-keyword advice (the
    message says what to do on the command line)."""
    for _ in range(16):  # a chain is short; a cycle must not hang
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    lines = str(error).strip().splitlines()
    text = re.sub(r"\s*Use `pretrained=False`.*", "", lines[0] if lines else "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(
    spec: ModelSpec | str,
    *,
    num_classes: int | None = None,
    pretrained: bool = True,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: int | None = None,
) -> LoadedModel:
    """Build the spec's timm model with its weights, in eval mode on CPU.

    With a checkpoint file, its weights; a fastkd checkpoint also brings its constructor kwargs and
    data config. Without one, timm's pretrained weights (this needs the network or timm's cache)
    or, with ``pretrained=False``, a random init. ``num_classes`` left at None keeps the weights'
    classifier; a different count replaces the classifier with a fresh one (fine-tuning to a new
    label set). ``input_size`` overrides the data config's image size (``with_input_size``).
    ``spec``: a ``ModelSpec`` or its text, ``[alias:]ARCH[=CKPT]`` as on the command line.
    """
    if isinstance(spec, str):
        spec = ModelSpec.parse(spec)
    register_architectures()  # fastkd's own (the demo's mixer): its checkpoints load anywhere
    if spec.arch.lower().startswith("local-dir:"):  # timm would read the folder's files itself
        raise ConfigError(
            f"model {spec.name!r}: {spec.arch!r} has timm read a folder of yours with its own "
            "loader and arguments; fastkd reads a weights file itself, weights only: give the "
            "architecture and the file, ARCH=FILE (a .safetensors, .pt or .pth)"
        )
    if ":" not in spec.arch and not timm.is_model(spec.arch):
        raise ConfigError(f"model {spec.name!r}: {spec.arch!r} is not a timm model name")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    check_model_kwargs(kwargs, f"model {spec.name!r}")
    replaced_head = None
    if spec.checkpoint is None:
        if num_classes is not None:
            _check_head_size(spec, kwargs, num_classes)
            kwargs["num_classes"] = num_classes
        if pretrained:
            model = _create_pretrained(spec, kwargs)
        else:
            model = _create(spec, kwargs, f"model {spec.name!r}", ConfigError)
        data_config = resolve_model_data_config(model)
        source = TIMM_SOURCE
        sha256 = state_dict_sha256(model)
    else:
        path = spec.checkpoint
        payload = read_checkpoint(path)  # weights only, its model_kwargs checked
        if is_fastkd_checkpoint(payload):
            if payload["arch"] != spec.arch:
                raise CheckpointError(
                    f"checkpoint {path} holds a {payload['arch']!r} model, not {spec.arch!r}"
                )
            kwargs = {**payload.get("model_kwargs", {}), **kwargs}
            state_dict = payload["state_dict"]
            saved_config = payload["data_config"]
        else:
            state_dict = plain_state_dict(payload, path)
            saved_config = None
            if "num_classes" not in kwargs:
                rows = _classifier_rows(spec.arch, state_dict)
                if rows is not None:
                    kwargs["num_classes"] = rows
        shape = _on_meta(spec, kwargs)  # the architecture, without memory: does it fit?
        if shape is not None:  # then a crafted kwarg cannot make the real one huge
            _check_fits(shape, state_dict, spec.arch, path)
        model = _create(spec, kwargs, f"checkpoint {path}", CheckpointError)
        _check_fits(model, state_dict, spec.arch, path)
        model.load_state_dict(state_dict)
        data_config = saved_config or resolve_model_data_config(model)
        source = CHECKPOINT_SOURCE if saved_config else TIMM_SOURCE
        sha256 = file_sha256(path)
        if num_classes is not None and num_classes != model.num_classes:
            _check_head_size(spec, kwargs, num_classes, model)
            replaced_head = int(model.num_classes)
            log.warning(
                "model %r: checkpoint %s has a %d-class head; a fresh, untrained %d-class head "
                "replaces it", spec.name, path, replaced_head, num_classes,
            )  # fmt: skip
            model.reset_classifier(num_classes)
            kwargs["num_classes"] = num_classes
    model.eval()
    if input_size is not None:
        data_config, source = with_input_size(data_config, input_size), OVERRIDE_SOURCE
    return LoadedModel(
        spec=spec,
        model=model,
        data_config=json_data_config(data_config),
        sha256=sha256,
        num_classes=int(model.num_classes),
        model_kwargs=kwargs,
        input_source=source,
        replaced_head=replaced_head,
    )


def _check_head_size(
    spec: ModelSpec,
    kwargs: Mapping[str, Any],
    num_classes: int,
    model: torch.nn.Module | None = None,
) -> None:
    """Refuse a classifier of ``num_classes`` that no memory holds (a label of the data set far
    above its real classes makes one), before it is allocated: the features it would read are
    the model's, or those of the architecture built on the meta device (no memory)."""
    if model is None:
        model = _on_meta(spec, {**kwargs, "num_classes": 1})
    features = int(getattr(model, "num_features", 0) or 0)
    if features * num_classes > MAX_HEAD_WEIGHTS:
        raise ConfigError(
            f"model {spec.name!r}: a {num_classes}-class classifier on its {features} features "
            f"would hold {features * num_classes:.3g} weights: is a label of the data far above "
            "its real classes? (labels are 0 to the number of classes - 1)"
        )


def _on_meta(spec: ModelSpec, kwargs: Mapping[str, Any]) -> torch.nn.Module | None:
    """The architecture built on the meta device (shapes, no memory, no init), or None where
    timm cannot build it there (its real build then decides)."""
    try:
        with torch.device("meta"):
            return timm.create_model(spec.arch, pretrained=False, **kwargs)
    except Exception:  # some constructors read values (``.item()``), which meta tensors lack
        return None


def _create(
    spec: ModelSpec, kwargs: Mapping[str, Any], where: str, error: type[Exception]
) -> torch.nn.Module:
    """``timm.create_model`` without weights; arguments timm cannot build from (a wrong type or
    value: they come from a file or a caller) are one ``error`` naming ``where`` they came from."""
    try:
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, AttributeError) as exc:
        raise error(
            f"{where}: timm cannot build {spec.arch!r} with model_kwargs {dict(kwargs)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from exc


class FP32Head(torch.nn.Module):
    """A classifier that runs in fp32 under autocast: the backbone may run in bf16, but the
    logits, and so the stored log-probabilities and the label's, are fp32 computations."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float())


def fp32_classifier(model: torch.nn.Module) -> int:
    """Wrap the classifier(s) of a timm model (``get_classifier``) in ``FP32Head``, in place.

    Returns how many were wrapped: 0 for a model without one (it then runs as autocast says).
    """
    get_classifier = getattr(model, "get_classifier", None)
    heads = get_classifier() if callable(get_classifier) else None
    heads = [h for h in (heads if isinstance(heads, tuple) else (heads,)) if h is not None]
    heads = [h for h in heads if not isinstance(h, torch.nn.Identity | FP32Head)]
    wrapped = 0
    for name, module in list(model.named_modules()):
        if name and any(module is head for head in heads):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attribute, FP32Head(module))
            wrapped += 1
    return wrapped
