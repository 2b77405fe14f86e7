"""The kernels compile for H100 (sm_90) and A100 (sm_80) at every benchmark configuration, with
no spill, and keep the bandwidth design: two resident blocks per SM, at most 3 exps per element
at T = 1, 16-byte loads on the aligned body of a row (odd C = 21841 included).

One run of ``fastkd bench compile`` (ahead-of-time compile through Triton, ptxas -v and
cuobjdump from the Triton wheel; no GPU) feeds every test here; conftest.py starts it when the
tests are collected.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(compile_run: tuple[int, Path]) -> dict:
    """The results of the run conftest.py started at collection (it runs while other tests do)."""
    returncode, out = compile_run
    results: dict = {
        arch: json.loads((out / f"compile-sm{arch}.json").read_text())["results"]
        for arch in (90, 80)
        if (out / f"compile-sm{arch}.json").exists()
    }
    results["returncode"] = returncode
    results["log"] = (out / "log.txt").read_text()
    return results


def test_every_configuration_compiles_for_both_architectures(compiled):
    assert set(compiled) >= {90, 80}, compiled["log"]
    for arch in (90, 80):
        failed = [f"{r['config']}: {r['error']}" for r in compiled[arch] if not r["ok"]]
        assert not failed, "\n".join(failed)
        kinds = {
            (r["config"]["kernel"], r["config"]["teacher"], r["config"]["models"])
            for r in compiled[arch]
        }
        # 9 teachers, N = 2, 3, 4, the grad_output scale pass
        assert len(compiled[arch]) >= 100 and len(kinds) == 9 + 3 + 1
        # 164 at the default shapes: 4 x (9 teachers x 3 modes + 2 teachers x 2 T + 3 N x 2 +
        # 3 scale dtypes), at 4096 x 32000 plain KD's launch (the mixture, one fp32 column), live
        # with the confidence score and the per-row scale, and the scale's masked remainder.
        assert len(compiled[arch]) == 164
        extra = {(r["config"]["mode"], r["config"]["score"]) for r in compiled[arch]}
        assert {("plain", "label"), ("live", "confidence")} <= extra


def test_no_configuration_spills(compiled):
    for arch in (90, 80):
        spilled = [
            f"{r['config']}: {r['spill_store_bytes']} B stored, {r['local_bytes']} B local"
            for r in compiled[arch]
            if r["spill_store_bytes"]
            or r["spill_load_bytes"]
            or r["local_bytes"]
            or r["stack_bytes"]
        ]
        assert not spilled, "\n".join(spilled)
    assert compiled["returncode"] == 0, compiled["log"]


def test_at_least_two_blocks_fit_on_an_sm(compiled):
    for arch in (90, 80):
        crowded = [
            f"{r['config']}: {r['registers']} registers x {r['num_warps']} warps"
            for r in compiled[arch]
            if r["blocks_per_sm"] < 2
        ]
        assert not crowded, "\n".join(crowded)


def test_at_most_three_exps_per_element_at_unit_temperature(compiled):
    for r in compiled[90]:
        if r["config"]["temperature"] == 1.0 and r["config"]["kernel"] != "grad_scale":
            assert 0 < r["ex2_per_element"] <= 3, r["config"]
    dense_t2 = [
        r
        for r in compiled[90]
        if r["config"]["temperature"] == 2.0 and r["config"]["teacher"].startswith("dense")
    ]
    assert dense_t2 and all(r["ex2_per_element"] <= 4 for r in dense_t2)


def test_whole_tiles_use_16_byte_loads_and_stores_on_odd_rows(compiled):
    odd = [
        r
        for r in compiled[90]
        if r["config"]["classes"] == 21841
        and (r["config"]["kernel"] != "bidirectional" or r["config"]["models"] == 2)
        and r["config"]["mode"] != "tail"  # the remainder: one masked program
        and r["config"]["dtype"] == "bfloat16"
    ]
    assert {r["config"]["kernel"] for r in odd} == {"partitioned", "bidirectional", "grad_scale"}
    for r in odd:
        assert r["loads"].get("LDG.E.128", 0) > 0, (r["config"], r["loads"])
        assert r["stores"].get("STG.E.128", 0) > 0, (r["config"], r["stores"])
