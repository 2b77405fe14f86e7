"""Model specs, checkpoint files and loading: real timm models, outputs compared with the originals."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest
import timm
import torch

from fastkd import pretrained
from fastkd.checkpoints import save_checkpoint
from fastkd.errors import CheckpointError, WeightsUnavailableError
from fastkd.models import (
    ModelSpec,
    fp32_classifier,
    load_model,
    parse_pool,
    state_dict_sha256,
)

CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


@pytest.mark.parametrize(
    ("text", "arch", "checkpoint", "name"),
    [
        ("resnet18", "resnet18", None, "resnet18"),
        ("resnet18=ckpt/best.pt", "resnet18", Path("ckpt/best.pt"), "best"),
        ("teacher:resnet18=best.pt", "resnet18", Path("best.pt"), "teacher"),
        ("hf-hub:timm/resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", None, "resnet18.a1_in1k"),
        ("big:hf-hub:timm/vit_base", "hf-hub:timm/vit_base", None, "big"),
        ("vit=runs/a=1/last.pt", "vit", Path("runs/a=1/last.pt"), "last"),
    ],
)
def test_spec_parse(text: str, arch: str, checkpoint: Path | None, name: str) -> None:
    assert ModelSpec.parse(text) == ModelSpec(arch, checkpoint, name)


@pytest.mark.parametrize(
    ("text", "message"),
    [("resnet18=", "empty checkpoint"), (":resnet18", "empty alias"), ("a:", "no model")],
)
def test_spec_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec.parse(text)


def test_pool_names_are_unique() -> None:
    names = [s.name for s in parse_pool(["resnet18", "resnet18", "x:vit", "resnet18", "a=x.pt"])]
    assert names == ["resnet18", "resnet18-2", "x", "resnet18-3", "x-2"]
    with pytest.raises(ValueError, match="alias 'a' names two"):
        parse_pool(["a:resnet18", "a:vit"])


def _tiny(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=num_classes).eval()


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return torch.equal(a(x), b(x))


def test_fastkd_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _tiny()
    path = save_checkpoint(
        tmp_path / "m.pt", model, "test_efficientnet", {"num_classes": 10}, CONFIG, {"epoch": 3}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    loaded = load_model(ModelSpec.parse(f"test_efficientnet={path}"))
    assert _same_outputs(model, loaded.model)
    assert not loaded.model.training
    assert loaded.num_classes == 10
    assert loaded.data_config == {
        **CONFIG,
        "input_size": [3, 32, 32],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.load(path, weights_only=True)["extra"] == {"epoch": 3}


def test_plain_state_dict_infers_classes(tmp_path: Path) -> None:
    model = _tiny(num_classes=7)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "w.pth",
    )
    loaded = load_model(ModelSpec.parse(f"test_efficientnet={tmp_path / 'w.pth'}"))
    assert loaded.num_classes == 7
    assert _same_outputs(model, loaded.model)
    # No data config in a plain state dict: timm's, resolved from the architecture.
    assert loaded.data_config["input_size"] == list(
        timm.create_model("test_efficientnet").pretrained_cfg["input_size"]
    )


def test_new_class_count_replaces_the_head(tmp_path: Path) -> None:
    model = _tiny()
    path = save_checkpoint(
        tmp_path / "m.pt", model, "test_efficientnet", {"num_classes": 10}, CONFIG
    )
    loaded = load_model(ModelSpec.parse(f"test_efficientnet={path}"), num_classes=3)
    assert loaded.num_classes == 3
    assert loaded.model.get_classifier().out_features == 3
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in body.items())


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    torch.save(_tiny().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as error:
        load_model(ModelSpec.parse(f"test_convnext={tmp_path / 'w.pth'}"))
    message = str(error.value)
    assert str(tmp_path / "w.pth") in message and "'test_convnext'" in message
    assert "missing keys" in message and "stem.0.weight" in message
    assert "unexpected keys" in message and "conv_stem.weight" in message

    path = save_checkpoint(
        tmp_path / "m.pt", _tiny(), "test_efficientnet", {"num_classes": 10}, CONFIG
    )
    with pytest.raises(CheckpointError, match="holds a 'test_efficientnet' model, not 'test_vit'"):
        load_model(ModelSpec.parse(f"test_vit={path}"))


def test_unusable_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_model(ModelSpec.parse(f"test_vit={tmp_path / 'missing.pt'}"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt cannot be read"):
        load_model(ModelSpec.parse(f"test_vit={tmp_path / 'junk.pt'}"))
    with pytest.raises(ValueError, match="'no_such_net' is not a timm model"):
        load_model(ModelSpec.parse("no_such_net"), pretrained=False)


def test_state_dict_hash_tracks_weights() -> None:
    model = _tiny()
    before = state_dict_sha256(model)
    assert state_dict_sha256(_tiny()) == before
    with torch.no_grad():
        model.classifier.bias[0] += 1e-3
    assert state_dict_sha256(model) != before


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_fp32_classifier_keeps_the_head_fp32_under_bf16_autocast(arch: str) -> None:
    """A bf16 backbone (as on a GPU) with the head in fp32: the logits are the fp32 head of the
    bf16 features to fp32 rounding, where plain autocast leaves them bf16-precise."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000).eval()
    images = torch.randn(4, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(images)
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert plain.dtype == torch.bfloat16
    assert fp32_classifier(model) == 1 and fp32_classifier(model) == 0  # wrapped once
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    head = model.get_classifier().head
    exact = features.double() @ head.weight.double().T + head.bias.double()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)
    assert (plain.double() - exact).abs().max() > 100 * (logits.double() - exact).abs().max()


# -- timm's pretrained weights without network: one line, at once --------------------------


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache and a hub that refuses connections (a closed local port):
    what a machine without network sees, whether or not this one has network."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


def _fails_fast(spec: str) -> str:
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        load_model(ModelSpec.parse(spec))
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_bare_timm_name_without_network_fails_at_once_in_one_line(
    no_hub: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        message = _fails_fast("net:resnet18")
    assert "model 'net': timm's pretrained weights for 'resnet18' could not be downloaded" in (
        message
    )
    assert "127.0.0.1:9 unreachable, ConnectionRefusedError" in message
    assert "give a local weights file instead, resnet18=CKPT" in message
    # No retry warnings, no "Loading pretrained weights" line: the error is the one line.
    assert not [r for r in caplog.records if r.name.startswith(("huggingface_hub", "timm"))]


def test_hf_hub_offline_set_after_import_fails_at_once(
    no_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub read it at import: too late
    monkeypatch.setattr(pretrained, "probe", lambda *a, **k: pytest.fail("probed offline"))
    assert "resnet18=CKPT" in _fails_fast("resnet18")


def test_cached_weights_load_without_touching_the_network(
    no_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    monkeypatch.setattr(pretrained, "probe", lambda *a, **k: pytest.fail("probed with a cache"))
    model = _tiny(1000)
    repo = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    folder = no_hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(model.state_dict(), folder / "snapshots" / ("0" * 40) / "model.safetensors")
    started = time.perf_counter()
    loaded = load_model(ModelSpec.parse("test_efficientnet"))
    assert time.perf_counter() - started < 5.0
    assert loaded.sha256 == state_dict_sha256(model)
