"""A checkpoint or run state cannot run code, and a bad one is one named `error:` line.

Crafted checkpoints (fastkd's own format, read with ``weights_only=True``) try to make timm load
a second, pickled file through ``model_kwargs`` (``checkpoint_path``, a ``pretrained_cfg_overlay``
file) or to pass other arguments timm should not see; others are not checkpoints at all. Each is
refused by `fastkd dump`, `fastkd eval` and ``fastkd.load_model`` naming the file and the key,
and the pickled payload never runs (it would create a sentinel file). Run states get the same
treatment on ``--resume``. No message ever suggests loading with ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from test_cli_messages import DATA_CONFIG, assert_one_line_error, invoke, tiny  # noqa: F401

from fastkd.checkpoints import read_checkpoint, save_checkpoint
from fastkd.errors import CheckpointError, ConfigError
from fastkd.models import load_model

ARCH = "test_convnext"


class _RunsCode:
    """Unpickling this calls ``os.system``: the attack a checkpoint must never carry out."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory, tiny: SimpleNamespace) -> SimpleNamespace:  # noqa: F811
    """A pickle that runs code (and the sentinel it would create), and a real checkpoint."""
    root = tmp_path_factory.mktemp("crafted")
    sentinel = root / "code-ran"
    evil = root / "evil.pkl"
    torch.save({"weights": _RunsCode(sentinel)}, evil)  # a plain (not weights-only) pickle
    good = Path(tiny.spec.split("=", 1)[1])
    payload = torch.load(good, weights_only=True)
    return SimpleNamespace(root=root, sentinel=sentinel, evil=evil, payload=payload, tiny=tiny)


def _write(crafted: SimpleNamespace, name: str, payload) -> Path:
    path = crafted.root / f"{name}.pt"
    torch.save(payload, path)
    return path


def _with_kwargs(crafted: SimpleNamespace, name: str, **kwargs) -> Path:
    payload = dict(crafted.payload)
    payload["model_kwargs"] = {**payload["model_kwargs"], **kwargs}
    return _write(crafted, name, payload)


REFUSED_KWARGS = {
    "checkpoint_path": lambda c: {"checkpoint_path": str(c.evil)},
    "pretrained": lambda c: {"pretrained": True},
    "pretrained_cfg": lambda c: {"pretrained_cfg": {"file": str(c.evil)}},
    "file": lambda c: {"pretrained_cfg_overlay": {"file": str(c.evil)}},
    "cache_dir": lambda c: {"cache_dir": str(c.root)},
    "banana": lambda c: {"banana": 1},
    "depths": lambda c: {"depths": torch.ones(2)},  # an allowed key with a tensor value
}


@pytest.mark.parametrize("key", sorted(REFUSED_KWARGS))
def test_refused_model_kwargs_are_named_by_every_command_and_no_code_runs(crafted, key, tmp_path):
    path = _with_kwargs(crafted, key, **REFUSED_KWARGS[key](crafted))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: .*'{key}'"):
        load_model(f"{ARCH}={path}")
    data = str(crafted.tiny.data)
    for args in (
        ["dump", "--data", data, "--model", f"{ARCH}={path}", "--out", str(tmp_path / "s.zarr")],
        ["eval", "--data", data, "--model", f"m:{ARCH}={path}"],
    ):
        line = assert_one_line_error(invoke(args))
        assert str(path) in line and repr(key) in line, line
    assert not crafted.sentinel.exists()


def test_plain_checkpoint_model_kwargs_still_load(crafted):
    """The allow-list keeps what fastkd writes: architecture arguments with plain values and a
    data-config overlay (the demo pool's checkpoints carry one)."""
    overlay = {"input_size": (3, 16, 16), "crop_pct": 1.0}
    path = _with_kwargs(crafted, "ok", drop_path_rate=0.0, pretrained_cfg_overlay=overlay)
    loaded = load_model(f"{ARCH}={path}")
    assert loaded.model_kwargs["pretrained_cfg_overlay"] == overlay
    assert loaded.num_classes == 2


@pytest.mark.parametrize(
    "payload, why",
    [
        ([1, 2], "holds a list, not a state dict"),
        (torch.ones(3), "holds a Tensor, not a state dict"),
        ({"format": "fastkd-checkpoint", "model_kwargs": {}}, "without an architecture"),
        ({"layer.weight": "not a tensor"}, "'layer.weight' holds a str, not a tensor"),
        ({}, "holds no weights"),
    ],
    ids=["list", "tensor", "no-arch", "not-tensors", "empty"],
)
def test_what_is_not_a_checkpoint_is_one_line_naming_the_file(crafted, payload, why):
    path = _write(crafted, "shape", payload)
    line = assert_one_line_error(
        invoke(["eval", "--data", str(crafted.tiny.data), "--model", f"m:{ARCH}={path}"])
    )
    assert str(path) in line and why in line, line


def test_a_fastkd_checkpoint_with_string_model_kwargs_is_refused(crafted):
    payload = {**crafted.payload, "model_kwargs": "num_classes=2"}
    path = _write(crafted, "string", payload)
    with pytest.raises(CheckpointError, match="model_kwargs is a str, not a dict"):
        read_checkpoint(path)


def test_arguments_timm_cannot_build_from_are_named(crafted):
    path = _with_kwargs(crafted, "badvalue", depths="deep")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: timm cannot build"):
        load_model(f"{ARCH}={path}")


def _unreadable(crafted: SimpleNamespace) -> dict[str, Path]:
    good = (crafted.root / "good.pt").read_bytes() if (crafted.root / "good.pt").exists() else None
    if good is None:
        torch.save(crafted.payload, crafted.root / "good.pt")
        good = (crafted.root / "good.pt").read_bytes()
    files = {
        "empty": b"",
        "junk": b"hello, this is not a checkpoint",
        "cut": good[: len(good) // 2],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = crafted.root / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["pickled"] = crafted.evil
    return paths


@pytest.mark.parametrize("name", ["empty", "junk", "cut", "pickled"])
def test_unreadable_checkpoints_say_why_and_never_suggest_weights_only_false(crafted, name):
    path = _unreadable(crafted)[name]
    line = assert_one_line_error(
        invoke(["eval", "--data", str(crafted.tiny.data), "--model", f"m:{ARCH}={path}"])
    )
    assert f"checkpoint {path} cannot be read: " in line
    reason = line.split("cannot be read: ", 1)[1]
    assert len(reason) > 20 and reason != "101", line  # a reason, not torch's bare key
    assert "weights_only" not in line and "trusted" not in line, line
    if name == "pickled":
        assert "posix.system" in line and "never code" in line
    assert not crafted.sentinel.exists()


def test_a_timm_training_checkpoint_with_its_arguments_loads(tmp_path):
    """timm's train.py saves its argparse Namespace beside the weights; it is data, so it loads
    with the weights (timm's own loader allows it too)."""
    model = timm.create_model(ARCH, num_classes=3)
    path = tmp_path / "model_best.pth.tar"
    args = argparse.Namespace(model=ARCH, lr=0.1)
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "args": args}, path)
    loaded = load_model(f"{ARCH}={path}")
    assert loaded.num_classes == 3
    weights = loaded.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_model_kwargs_given_by_a_caller_are_held_to_the_same_list():
    with pytest.raises(ConfigError, match="'checkpoint_path' is not an architecture argument"):
        load_model(ARCH, pretrained=False, model_kwargs={"checkpoint_path": "/x.pt"})


def test_a_replaced_classifier_is_logged(crafted, caplog):
    """A 2-class checkpoint fine-tuned to 5 classes gets a fresh head: said, not silent."""
    path = _write(crafted, "two", crafted.payload)
    with caplog.at_level(logging.WARNING, logger="fastkd"):
        loaded = load_model(f"s:{ARCH}={path}", num_classes=5)
    assert loaded.num_classes == 5 and loaded.replaced_head == 2
    assert "has a 2-class head; a fresh, untrained 5-class head replaces it" in caplog.text


def test_save_checkpoint_writes_what_read_checkpoint_accepts(tmp_path):
    model = timm.create_model(ARCH, num_classes=2)
    path = save_checkpoint(tmp_path / "m.pt", model, ARCH, {"num_classes": 2}, DATA_CONFIG)
    payload = read_checkpoint(path)
    assert payload["arch"] == ARCH and payload["model_kwargs"] == {"num_classes": 2}


def test_every_read_is_weights_only_and_timm_never_loads_a_users_file(
    crafted, monkeypatch, tmp_path
):
    """Whatever timm is installed: fastkd's reads go through torch.load(weights_only=True),
    timm's own checkpoint loaders are never called for a user's file, and a refused argument
    never reaches timm.create_model."""
    reads = []
    real_load = torch.load

    def load(*args, **kwargs):
        reads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("timm loaded a user's file with its own loader")

    created = []
    real_create = timm.create_model
    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(timm.models, "load_checkpoint", never)
    monkeypatch.setattr(timm.models._builder, "load_checkpoint", never, raising=False)
    monkeypatch.setattr(
        timm, "create_model", lambda *a, **k: created.append(k) or real_create(*a, **k)
    )
    good = _with_kwargs(crafted, "spy-good")
    load_model(f"{ARCH}={good}")
    bad = _with_kwargs(crafted, "spy-bad", checkpoint_path=str(crafted.evil))
    with pytest.raises(CheckpointError):
        load_model(f"{ARCH}={bad}")
    assert reads and all(flag is True for flag in reads)
    assert created and not any("checkpoint_path" in kwargs for kwargs in created)
    assert not crafted.sentinel.exists()


def test_a_local_dir_model_is_refused_for_a_weights_file(tmp_path):
    with pytest.raises(ConfigError, match=r"give the architecture and the file, ARCH=FILE"):
        load_model(f"local-dir:{tmp_path}")


@pytest.mark.parametrize("kwargs", [{"num_classes": 10**10}, {"dims": [10**5] * 4}])
def test_architecture_arguments_that_do_not_fit_the_weights_are_refused_before_any_memory(
    crafted, kwargs
):
    """Plain values, allowed keys, absurd sizes: the architecture is built on the meta device
    and held to the checkpoint's tensors before a byte is allocated."""
    path = _with_kwargs(crafted, "huge", **kwargs)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} does not fit architecture"):
        load_model(f"{ARCH}={path}")
