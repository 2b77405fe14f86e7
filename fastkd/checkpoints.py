"""Checkpoint files: written atomically, read as weights only, checked before timm sees them.

A checkpoint is a user's file, and a file can carry code: a pickle runs whatever it names, and a
fastkd checkpoint's ``model_kwargs`` go to ``timm.create_model``, where ``checkpoint_path`` or
``pretrained_cfg_overlay={"file": ...}`` would make timm load a second file with its own loader.
So every checkpoint and run state is read with ``torch.load(weights_only=True)`` and nothing
else (torch >= 2.6, whose weights-only unpickler has no known way around it; timm >= 1.0.26,
whose own loaders read weights only too, for its pretrained weights); what it holds is checked (a mapping of tensors, or a fastkd
checkpoint with the fields it needs); and ``model_kwargs`` must be architecture arguments from an
allow-list with plain values (numbers, strings, booleans, lists of them). A refusal is one
``CheckpointError`` naming the file and the key, and never suggests ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastkd.errors import CheckpointError, ConfigError
from fastkd.files import atomic_torch_save

CHECKPOINT_FORMAT = "fastkd-checkpoint"
CHECKPOINT_VERSION = 1

# timm architecture arguments a checkpoint may pass to ``timm.create_model``: the shape of the
# network (widths, depths, heads, patches, image size), its regularisation and its head. Not
# here, and so refused: anything that names a file or weights (pretrained, checkpoint_path,
# pretrained_cfg's file/url/hub entries, cache_dir), takes a module or callable (block_fn,
# embed_layer, ...), or changes what the model returns (features_only).
ARCHITECTURE_KWARGS = frozenset(
    {
        # the head and the input
        "num_classes", "in_chans", "img_size", "global_pool", "class_token", "no_embed_class",
        "reg_tokens", "num_reg_tokens", "fc_norm", "head_hidden_size", "head_norm_first",
        "head_init_scale", "head_bias", "pre_norm", "final_norm", "dynamic_img_size",
        "dynamic_img_pad", "strict_img_size", "use_fc_norm",
        # the shape of the network
        "patch_size", "embed_dim", "embed_dims", "depth", "depths", "num_heads", "num_kv_heads",
        "head_dim", "mlp_ratio", "mlp_ratios", "channels", "dims", "widths", "width", "layers",
        "num_blocks", "num_features", "stem_width", "stem_type", "stem_size", "stem_stride",
        "stem_kernel_size", "base_width", "cardinality", "output_stride", "window_size",
        "width_mult", "width_multiplier", "depth_mult", "depth_multiplier", "channel_multiplier",
        "growth_rate", "bn_size", "block_reduce_first", "avg_down", "down_kernel_size",
        "kernel_sizes", "expand_ratio", "se_ratio", "key_dim", "attn_ratio", "qkv_bias",
        "qk_norm", "proj_bias", "conv_bias", "init_values", "ls_init_value",
        "layer_scale_init_value", "use_abs_pos_emb", "use_rel_pos_bias", "pos_embed",
        "use_grn", "conv_mlp", "zero_init_last", "weight_init", "fix_init",
        # layers named by timm's registries (strings only: values are checked to be plain)
        "act_layer", "norm_layer", "attn_layer", "pad_type", "norm_eps",
        # regularisation
        "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate",
        "patch_drop_rate", "drop_block_rate",
        # the preprocessing timm records with the model (checked key by key below)
        "pretrained_cfg_overlay",
    }
)  # fmt: skip
# Keys of a ``pretrained_cfg_overlay``: how images are prepared, never where weights come from.
DATA_CONFIG_KEYS = frozenset(
    {
        "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation",
        "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
        "first_conv", "classifier", "label_offset",
    }
)  # fmt: skip
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)", re.IGNORECASE)


def save_checkpoint(
    path: str | os.PathLike,
    model: Any,
    arch: str,
    model_kwargs: Mapping[str, Any],
    data_config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a fastkd checkpoint atomically (temp file in the same folder, then ``os.replace``).

    ``model_kwargs`` are the ``timm.create_model`` keyword arguments that rebuild the architecture
    (``num_classes``, ``img_size``, ...); ``extra`` holds anything else the caller wants back
    (optimizer state, epoch) under the key ``"extra"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "model_kwargs": dict(model_kwargs),
        "data_config": json_data_config(data_config),
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }
    return atomic_torch_save(path, payload)


def json_data_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A timm data config as plain JSON types (tuples become lists), as stored in a manifest."""
    return json.loads(json.dumps(dict(config)))


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (tensors and plain values; no pickled
    code runs), or safetensors; a file that cannot be read so is a ``CheckpointError`` saying
    why in the user's terms (``what`` names the file's role: checkpoint, run state)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py args
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:
        raise CheckpointError(f"{what} {path} cannot be read: {_load_failure(error)}") from None


def _load_failure(error: BaseException) -> str:
    """Why ``torch.load`` failed, without torch's advice to load with ``weights_only=False``
    (which would run the file's code: fastkd never does)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "weights only" in text.lower():
        found = _UNSUPPORTED_GLOBAL.search(text)
        named = f" ({found.group(1)})" if found else ""
        return (
            f"it holds pickled Python objects other than tensors and plain values{named}, and "
            "fastkd loads weights only, never code: save the weights alone, e.g. "
            "torch.save(model.state_dict(), path), or as safetensors"
        )
    if isinstance(error, EOFError):
        return "the file is empty or cut short"
    first = re.split(r"(?<=\.)\s", text.strip(), maxsplit=1)[0] if text.strip() else ""
    return (
        f"not a PyTorch or safetensors file, or a damaged one ({type(error).__name__}"
        + (f": {first}" if first else "")
        + ")"
    )


def is_fastkd_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file's payload, checked: a fastkd checkpoint (arch, model_kwargs within the
    allow-list, data config, state dict) or a mapping holding a state dict of tensors."""
    path = Path(path)
    payload = read_torch_file(path)
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(payload).__name__}, not a state dict or a fastkd "
            "checkpoint: save model.state_dict()"
        )
    if is_fastkd_checkpoint(payload):
        _check_fastkd_payload(path, payload)
    else:
        plain_state_dict(payload, path)  # refuses a mapping without tensors
    return payload


def _check_fastkd_payload(path: Path, payload: dict[str, Any]) -> None:
    """A fastkd checkpoint's fields have the types later code relies on."""
    where = f"checkpoint {path}"
    arch = payload.get("arch")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"{where}: a fastkd checkpoint without an architecture ('arch')")
    kwargs = payload.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: model_kwargs is a {type(kwargs).__name__}, not a dict")
    check_model_kwargs(kwargs, where, CheckpointError)
    config = payload.get("data_config")
    problem = None if config in (None, {}) else data_config_problem(config)  # none: timm's own
    if problem is not None:
        raise CheckpointError(f"{where}: data_config {problem}")
    weights = payload.get("state_dict")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: no state_dict (a dict of tensors) in the checkpoint")
    _check_tensors(weights, where)


def check_model_kwargs(
    kwargs: Mapping[str, Any], where: str, error: type[Exception] = ConfigError
) -> None:
    """Refuse, naming the key, ``timm.create_model`` arguments outside ``ARCHITECTURE_KWARGS``
    or with values other than plain ones (a ``pretrained_cfg_overlay``: ``DATA_CONFIG_KEYS``)."""
    for key, value in kwargs.items():
        if key not in ARCHITECTURE_KWARGS:
            raise error(
                f"{where}: model_kwargs {key!r} is not an architecture argument fastkd passes to "
                "timm (arguments that load files or weights, or take code, are refused; weights "
                "come from the checkpoint itself)"
            )
        if key == "pretrained_cfg_overlay":
            if not isinstance(value, dict):
                raise error(f"{where}: model_kwargs 'pretrained_cfg_overlay' must be a dict")
            for inner, setting in value.items():
                if inner not in DATA_CONFIG_KEYS:
                    raise error(
                        f"{where}: model_kwargs pretrained_cfg_overlay {inner!r} is not a data "
                        f"config key (allowed: {', '.join(sorted(DATA_CONFIG_KEYS))})"
                    )
                if not _plain(setting):
                    raise error(f"{where}: pretrained_cfg_overlay {inner!r} = {_brief(setting)}")
        elif not _plain(value):
            raise error(
                f"{where}: model_kwargs {key!r} = {_brief(value)} is not a plain value (numbers, "
                "strings, booleans, None and lists of them)"
            )


def _plain(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple) and depth < 3:
        return all(_plain(item, depth + 1) for item in value)
    return False


def _brief(value: Any) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= 60 else text[:57] + "..."


def data_config_problem(config: Any) -> str | None:
    """What is wrong with a stored timm data config (None if nothing): its input size, and the
    types and ranges of the other keys the view loader reads, where present."""
    if not isinstance(config, dict):
        return f"is a {type(config).__name__}, not a dict"
    size = config.get("input_size")
    if not (
        isinstance(size, list | tuple)
        and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        return f"input_size must be 3 positive integers, got {_brief(size)}"
    for key in ("mean", "std"):
        values = config.get(key)
        if values is not None and not (
            isinstance(values, list | tuple)
            and len(values) == 3
            and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            and (key == "mean" or all(v > 0 for v in values))
        ):
            return f"{key} must be 3 finite numbers{' > 0' if key == 'std' else ''}, got {_brief(values)}"
    if not isinstance(config.get("interpolation", "bilinear"), str):
        return f"interpolation must be a name, got {_brief(config.get('interpolation'))}"
    crop = config.get("crop_pct", 1.0)
    if not (isinstance(crop, int | float) and 0 < crop <= 1):
        return f"crop_pct must be in (0, 1], got {_brief(crop)}"
    return None


def plain_state_dict(payload: Mapping[str, Any], path: Path | None = None) -> dict[str, Any]:
    """The weights of a timm training checkpoint (EMA first, as timm does) or a bare state dict,
    every value a tensor."""
    import timm

    where = f"checkpoint {path}" if path is not None else "checkpoint"
    weights: Any = payload
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(payload.get(key), Mapping):
            weights = payload[key]
            break
    _check_tensors(weights, where)
    return timm.models.clean_state_dict(dict(weights))


def _check_tensors(weights: Mapping[str, Any], where: str) -> None:
    import torch

    if not weights:
        raise CheckpointError(f"{where} holds no weights")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{where}: {key!r} holds a {type(value).__name__}, not a tensor: not a state dict "
                "(save model.state_dict())"
            )
