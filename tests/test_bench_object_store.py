"""The object-storage choice benchmark runs: its --quick pass, end to end against moto.

It compares obstore with s3fs, which fastkd does not depend on: the test runs where a current
s3fs is installed (``pip install s3fs``) and is skipped, saying so, elsewhere (CI)."""

from __future__ import annotations

import json

import pytest


def test_object_store_choice_quick(tmp_path):
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs", minversion="2024.1", reason="s3fs (>= 2024.1) is not installed")
    from fastkd.bench import object_store_choice

    out = tmp_path / "choice.json"
    object_store_choice.main(["--quick", "--dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    # Every backend read the same blocks (checked against the written values) and was timed.
    assert set(result["reads"]) == {"obstore", "fsspec", "fsspec_one_request", "local"}
    for by_concurrency in result["reads"].values():
        assert set(by_concurrency) == {"1", "8"}
        assert all(
            r["views_per_s"] > 0 and r["stored_MB_per_s"] > 0 for r in by_concurrency.values()
        )
    assert result["faults"] == {"skipped": "--no-faults"}
    assert "cores" in result["machine"]
    # Its scratch copy was removed; the results file is what is left.
    assert [p.name for p in tmp_path.iterdir()] == ["choice.json"]
