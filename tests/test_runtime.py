"""``runtime.reproducible``: what it pins, in a fresh interpreter (as ``fastkd demo`` runs it);
``runtime.fast_memory_format`` / ``in_fast_layout``: channels_last on a GPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from fastkd.runtime import PINNED_CPU_PATHS, fast_memory_format, in_fast_layout

_PROBE = """
import json, os, torch
from fastkd.runtime import reproducible
before = torch.are_deterministic_algorithms_enabled()
with reproducible("cpu") as numerics:
    inside = torch.are_deterministic_algorithms_enabled()
    torch.ones(8).sum()
env = {name: os.environ.get(name) for name in %r}
print(json.dumps({"numerics": numerics, "flags": [before, inside,
    torch.are_deterministic_algorithms_enabled()], "env_after": env}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_PATHS}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE % list(PINNED_CPU_PATHS)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cpu_paths_are_pinned_before_the_first_computation_and_restored_after():
    found = _probe()
    numerics = found["numerics"]
    assert {name: numerics[name] for name in PINNED_CPU_PATHS} == PINNED_CPU_PATHS
    assert numerics["cpu_capability"] in ("AVX2", "DEFAULT")  # never above AVX2
    assert numerics["threads"] >= 1
    assert found["flags"] == [False, True, False]  # deterministic inside only
    assert found["env_after"] == dict.fromkeys(PINNED_CPU_PATHS)  # the environment restored


def test_an_explicit_environment_value_wins():
    found = _probe(ATEN_CPU_CAPABILITY="default")
    assert found["numerics"]["cpu_capability"] == "DEFAULT"
    assert found["numerics"]["ATEN_CPU_CAPABILITY"] == "default"
    assert found["env_after"]["ATEN_CPU_CAPABILITY"] == "default"


def test_images_and_models_are_channels_last_on_a_gpu_only() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert fast_memory_format(gpu) is torch.channels_last
    assert fast_memory_format(cpu) is torch.preserve_format
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert in_fast_layout(images, cpu) is images  # no copy off the GPU
    fast = in_fast_layout(images, gpu)  # the layout only depends on the device's kind
    assert fast.is_contiguous(memory_format=torch.channels_last) and not fast.is_contiguous()
    assert torch.equal(fast, images) and fast.stride() == (60, 1, 15, 3)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=fast_memory_format(cpu))
    assert conv.weight.is_contiguous()
