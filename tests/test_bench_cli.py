"""`fastkd bench`: the CLI runs the benchmark it names with the arguments it is given."""

from __future__ import annotations

import json
import subprocess
import sys


def _fastkd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # A subprocess: the store benchmark pins its process to one core.
    command = [sys.executable, "-m", "fastkd.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_bench_store_runs_with_forwarded_arguments(tmp_path):
    out = tmp_path / "store.json"
    done = _fastkd(
        "bench", "store", "--samples", "96", "--views", "2", "--classes", "50",
        "--batch", "16", "--dir", str(tmp_path), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    # The arguments reached the benchmark, and it measured what it says it measures.
    assert (result["samples"], result["views"], result["classes"]) == (96, 2, 50)
    assert set(result["reads"]) == {"top5", "top10"}
    for reads in result["reads"].values():
        assert reads["warm"]["views_per_s"] > 0
    sizes = result["bytes_per_view"]["models"]
    assert 0 < sizes["top5"]["total"]["stored"] < sizes["top10"]["total"]["stored"]
    # Its scratch store was removed; the results file is what is left.
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]


def test_bench_help_and_bad_arguments():
    listed = _fastkd("bench", "--help")
    assert listed.returncode == 0
    for name in ("kernels", "store", "dump", "train"):
        assert name in listed.stdout
    helped = _fastkd("bench", "train", "--help")
    assert helped.returncode == 0 and "usage: fastkd bench train" in helped.stdout
    assert "--arch" in helped.stdout
    bad = _fastkd("bench", "kernels", "--no-such-option")
    assert bad.returncode == 2
    assert "unrecognized arguments: --no-such-option" in bad.stderr
