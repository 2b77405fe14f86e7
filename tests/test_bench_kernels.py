"""`fastkd bench kernels --alone` and `fastkd bench host` on CPU, at tiny shapes.

On CPU no CUDA graph is captured: the same code path runs each method as it is called, which is
what is checked here (the cases, the bytes each one counts, the arithmetic of its share of the
copy, the host time and what one training call dispatches). The bytes are counted by hand from
the case's shape and dtypes: bf16 student and gradient, fp16 dense teacher, top-k as fp16 values
and int32 ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastkd.bench import host, kernels

ROWS, CLASSES, TOPK = 8, 40, 3


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-alone") / "alone.json"
    kernels.main(
        ["--alone", "--device", "cpu", "--shapes", f"{ROWS}x{CLASSES}", "--topk", str(TOPK),
         "--reps", "1", "--graph-calls", "1", "--host-calls", "2", "--no-compile",
         "--out", str(out)]
    )  # fmt: skip
    return json.loads(out.read_text())


def test_alone_times_each_teacher_at_each_temperature(alone: dict) -> None:
    cases = [(e["case"]["teacher"], e["case"]["temperature"]) for e in alone["cases"]]
    assert cases == [("dense", 1.0), ("dense", 2.0), ("topk", 1.0), ("topk", 2.0)]
    for entry in alone["cases"]:
        methods = {m["method"]: m for m in entry["results"]}
        assert list(methods) == ["copy", "fastkd", "torch_compile", "liger_kl"]
        assert methods["torch_compile"]["note"] == "disabled (--no-compile)"
        assert methods["fastkd"]["time_ms"] > 0
        assert "no CUDA graph" in methods["fastkd"]["timing"]


def test_alone_counts_the_ideal_bytes_and_the_copys(alone: dict) -> None:
    logits = ROWS * CLASSES * 2  # bf16
    dense = next(e for e in alone["cases"] if e["case"]["teacher"] == "dense")
    topk = next(e for e in alone["cases"] if e["case"]["teacher"] == "topk")
    # Student read, one fp16 teacher row read, gradient written: 6C bytes a row.
    assert dense["ideal_bytes"] == 6 * ROWS * CLASSES == 3 * logits
    assert dense["copy_bytes"] == 3 * logits
    # Student read, gradient written, and K (fp16 value + int32 id) a row.
    assert topk["ideal_bytes"] == 2 * logits + ROWS * TOPK * (2 + 4)
    assert topk["copy_bytes"] == 2 * logits


def test_alone_shares_of_the_copy_follow_from_the_times(alone: dict) -> None:
    for entry in alone["cases"]:
        copy, fastkd = entry["results"][:2]
        assert copy["method"] == "copy" and copy["pct_copy"] == 100
        copy_gbps = entry["copy_bytes"] / copy["time_ms"] / 1e6
        gbps = entry["ideal_bytes"] / fastkd["time_ms"] / 1e6
        assert fastkd["gbps"] == pytest.approx(gbps)
        assert fastkd["pct_copy"] == pytest.approx(100 * gbps / copy_gbps)
        assert fastkd["host_us"] > 0


@pytest.fixture(scope="module")
def host_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-host") / "host.json"
    host.main(
        ["--shapes", "4x50,4x5000", "--topk", str(TOPK), "--temperatures", "2",
         "--calls", "3", "--out", str(out)]
    )  # fmt: skip
    return json.loads(out.read_text())


def test_host_times_the_training_call_with_its_launches_recorded(host_run: dict) -> None:
    assert host_run["timing"] == "Triton launches recorded, not run"
    shapes = [(e["case"]["classes"], e["case"]["teacher"]) for e in host_run["cases"]]
    assert shapes == [(50, "dense"), (50, "topk"), (5000, "dense"), (5000, "topk")]
    for entry in host_run["cases"]:
        assert entry["case"]["temperature"] == 2.0
        assert 0 < entry["min_us"] <= entry["median_us"]
        # One kernel, recorded not run: the training call (no checks, a config made once), at
        # most three operations besides it (the dot of the scaled sum, backward's ones)
        assert len(entry["triton_launches"]) == 1 and "kd" in entry["triton_launches"][0]
        assert entry["operations"] == sum(entry["operation_names"].values()) <= 3
        assert "aten::ge" not in entry["operation_names"], "no label or id check is timed"


def test_host_refuses_a_cpu_run_without_the_interpreter(tmp_path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "fastkd.cli.main", "bench", "host", "--calls", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "TRITON_INTERPRET" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
