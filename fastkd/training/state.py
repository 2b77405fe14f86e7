"""A run's resumable state: models, optimisers, schedulers, RNG states, epoch, step, best score.

Written atomically every epoch by rank 0 with every rank's RNG state; loads with
``weights_only=True`` (tensors and plain types only). ``resume`` refuses a state written with
another configuration, except for the fields that do not change what is computed.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastkd.checkpoints import read_torch_file
from fastkd.errors import CheckpointError, ConfigError
from fastkd.files import atomic_torch_save
from fastkd.loss_settings import LOSS_FIELDS, LossSettings
from fastkd.training.learners import Learner
from fastkd.training.summary import EpochRecord

STATE_FILE = "state.pt"
# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "resume",
        "overwrite",
        "device",
        "progress",
        "num_workers",
        "backend",
        "report",
        "eval_data",
        "control",  # the control is a run of its own: the main run computes the same
        "cuda_graphs",  # the same steps, launched by graph replay
        "torch_compile",  # the same steps, the forward and loss compiled
        "preset",  # where the values came from: the values themselves are compared
        "preset_not_applied",
    }
)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA) random states."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        # int64: uint32 tensors do not survive all_gather_object
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_run_state(
    path: Path, learners: list[Learner], progress: dict[str, Any], rng: list[dict[str, Any]]
) -> None:
    """Atomically write ``progress`` (config, epoch, step, best, history), the learners' states
    and every rank's RNG state."""
    learner_states = {
        learner.name: {
            "model": learner.model.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": None if learner.scheduler is None else learner.scheduler.state_dict(),
        }
        for learner in learners
    }
    atomic_torch_save(path, {**progress, "rng": rng, "learners": learner_states})


def current_spelling(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config as today's code writes it: the loss's settings under ``loss`` (they were
    fields of the config itself), mode "all" is "best", a config from before ``partition_score``
    compared log p(y) ("label"); one from before ``control`` had none; one from before
    ``model_lr`` trained every model at the run's lr; a store's run has no ``views``; one from
    before ``preset`` names none. A run without ``joint`` never read ``stop_grad``: it is the
    default (``--preset bi-kd`` saved False there before its unread settings were left out)."""
    saved = dict(saved)
    flat = {name: saved.pop(name) for name in LOSS_FIELDS if name in saved}
    loss = {**flat, **saved.get("loss", {})}
    if not saved.get("joint", False):
        loss.pop("stop_grad", None)
    saved["loss"] = LossSettings.from_dict(loss).to_dict()  # defaults for what it lacks
    saved.setdefault("control", False)  # before --control
    saved.setdefault("model_lr", {})  # before --lr NAME=VALUE: every model at the run's lr
    saved.setdefault("preset", None)  # before the preset was recorded
    saved.setdefault("preset_not_applied", [])
    if saved.get("store") is not None:
        saved["views"] = None  # a store's views are its own (saved as 1 before)
    return saved


def load_run_state(path: Path, config: dict[str, Any], learners: list[Learner]) -> dict[str, Any]:
    """Restore the learners from ``path`` and return its payload; refuse another configuration,
    and a state that is damaged or not one fastkd wrote (``CheckpointError``, one line)."""
    payload = read_torch_file(path, "run state")  # weights only: no pickled code runs
    _check_payload(path, payload, [learner.name for learner in learners])
    try:
        saved = current_spelling(payload["config"])
    except (ValueError, TypeError) as error:  # a mode or score this fastkd does not know
        raise damaged_state(path, f"its configuration cannot be read ({error})") from None
    changed = [k for k in config if k not in RESUMABLE_CHANGES and saved.get(k) != config[k]]
    if changed:
        details = "; ".join(
            f"{name}: {before!r} -> {after!r}"
            for k in changed
            for name, before, after in _differences(k, saved.get(k), config[k])
        )
        raise ConfigError(f"cannot resume {path} with another configuration: {details}")
    for learner in learners:
        state = payload["learners"][learner.name]
        try:
            learner.model.load_state_dict(state["model"])
            learner.optimizer.load_state_dict(state["optimizer"])
            if learner.scheduler is not None:
                learner.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise damaged_state(
                path, f"{learner.name}'s state does not fit its model ({_brief(error)})"
            ) from None
    return payload


def _differences(name: str, before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    """The fields that differ, nested ones by their path (``loss.temperature``)."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            difference
            for key in dict.fromkeys([*before, *after])
            if before.get(key) != after.get(key)
            for difference in _differences(f"{name}.{key}", before.get(key), after.get(key))
        ]
    return [(name, before, after)]


# What a run state holds at the top level, and the type of each (``save_run_state``).
_FIELDS = {
    "config": dict,
    "epoch": int,
    "step": int,
    "best": dict,
    "history": list,
    "rng": list,
    "learners": dict,
}


def _check_payload(path: Path, payload: Any, names: list[str]) -> None:
    """The fields ``resume`` reads, with their types, for every learner of this run."""
    if not isinstance(payload, dict):
        raise damaged_state(path, f"it holds a {type(payload).__name__}, not a run state")
    for field, kind in _FIELDS.items():
        if not isinstance(payload.get(field), kind) or isinstance(payload.get(field), bool):
            raise damaged_state(path, f"its {field!r} is missing or not a {kind.__name__}")
    for name in names:
        state = payload["learners"].get(name)
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise damaged_state(path, f"it has no state of the trained model {name!r}")
    for record in payload["history"]:
        if not _is_epoch_record(record):
            raise damaged_state(path, "its history is not a list of epoch records")
    for rng in payload["rng"]:
        if not isinstance(rng, dict) or not {"torch", "numpy", "python"} <= set(rng):
            raise damaged_state(path, "its random states are incomplete")


def _is_epoch_record(record: Any) -> bool:
    """``record`` makes an ``EpochRecord`` whose numbers are numbers (the loop formats them)."""
    fields = EpochRecord.__dataclass_fields__
    missing = dataclasses.MISSING
    needed = {n for n, f in fields.items() if f.default is missing and f.default_factory is missing}
    if not isinstance(record, dict) or set(record) - set(fields) or needed - set(record):
        return False
    numbers = (record.get(n, 0) for n in ("epoch", "steps", "loss", "taught", "seconds"))
    tables = (record.get(n, {}) for n in ("val_top1", "lr"))
    return all(_number(v) for v in numbers) and all(
        isinstance(t, dict) and all(_number(v) for v in t.values()) for t in tables
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _brief(error: BaseException, limit: int = 160) -> str:
    """An error's first line, shortened (torch lists every missing key on lines of their own)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def damaged_state(path: Path, why: str) -> CheckpointError:
    """The one message of a run state that cannot be resumed, and the two ways on."""
    return CheckpointError(
        f"run state {path} cannot be resumed: {why}. Start the run over in another --out, or "
        "with --overwrite in this one"
    )
