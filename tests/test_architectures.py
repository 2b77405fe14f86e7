"""fastkd's own timm architecture (the demo's mixer): registered where models are built, so a demo
checkpoint loads from the library in a fresh interpreter, without the CLI or ``fastkd.digits``."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import timm
import torch

from fastkd.checkpoints import save_checkpoint
from fastkd.digits import DIGITS_POOL
from fastkd.models import load_model

# A fresh interpreter: the library's public loader, nothing else of fastkd imported first.
_PROBE = """
import json, sys
import numpy as np, torch
import fastkd
loaded = fastkd.load_model(f"mixer:fastkd_mlp_mixer={sys.argv[1]}")
with torch.no_grad():
    logits = loaded.model(torch.from_numpy(np.load(sys.argv[2])))
imported = sorted(m for m in sys.modules if m in ("fastkd.cli", "fastkd.digits"))
print(json.dumps({"logits": logits.tolist(), "data_config": loaded.data_config,
    "imported": imported}))
"""


def test_a_demo_checkpoint_loads_from_the_library_in_a_fresh_interpreter(tmp_path: Path) -> None:
    (mixer,) = [member for member in DIGITS_POOL if member.arch == "fastkd_mlp_mixer"]
    torch.manual_seed(0)
    built = load_model(
        mixer.spec, pretrained=False, num_classes=10, model_kwargs=mixer.model_kwargs
    )
    path = save_checkpoint(
        tmp_path / "mixer.pt", built.model, mixer.arch, built.model_kwargs, built.data_config
    )
    images = torch.linspace(-1.0, 1.0, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    np.save(tmp_path / "images.npy", images.numpy())
    with torch.no_grad():
        expected = built.model(images)

    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["imported"] == []  # neither the CLI nor the digits registered it
    assert found["data_config"]["input_size"] == [3, 16, 16]  # the mixer's own, from img_size
    torch.testing.assert_close(torch.tensor(found["logits"]), expected, rtol=0, atol=1e-6)


def test_registering_twice_keeps_the_one_entry_without_a_warning() -> None:
    from fastkd.architectures import fastkd_mlp_mixer, register

    register()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        register()
    assert timm.models.model_entrypoint("fastkd_mlp_mixer") is fastkd_mlp_mixer
