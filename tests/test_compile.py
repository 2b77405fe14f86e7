"""The kernels compile for H100 (sm_90) and A100 (sm_80) at every benchmark configuration (each
KD one at T = 1 and 2, with bf16 and fp32 logits), with no spill and no stack frame, and keep the
bandwidth design: two resident blocks per SM, at most 3 exps per element at T = 1, whole-tile
loops software-pipelined (asynchronous copies of later tiles in the SASS of every one), 16-byte
loads on the aligned body of a row (odd C = 21841 included).

One run of ``fastkd bench compile`` (ahead-of-time compile through Triton, ptxas -v and
cuobjdump from the Triton wheel; no GPU) feeds every test here; conftest.py starts it when the
tests are collected.
"""

from __future__ import annotations

import dataclasses
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
        # 634 at the default shapes: 4 x (4 (T = 1, 2 x bf16, fp32 logits) x (9 teachers x
        # 3 modes + 3 N x 2 stop_grad) + 3 dense teachers x 3 modes x 2 dtypes with the
        # teacher's lse given at T = 2 + 3 at T = 4 + 3 scale dtypes), at 4096 x 32000 plain KD's
        # launch (the mixture, one fp32 column) and live with the confidence score, each at the
        # 4 (T, dtype), and the per-row scale; the scale's masked remainder.
        assert len(compiled[arch]) == 634
        extra = {(r["config"]["mode"], r["config"]["score"]) for r in compiled[arch]}
        assert {("plain", "label"), ("live", "confidence")} <= extra


def test_every_kd_configuration_is_checked_at_t_1_and_2_with_bf16_and_fp32_logits(compiled):
    seen: dict[tuple, set] = {}
    for r in compiled[90]:
        config = r["config"]
        if config["kernel"] == "grad_scale" or config["teacher_lse"] or config["temperature"] > 2:
            continue
        variant = tuple(v for k, v in sorted(config.items()) if k not in ("temperature", "dtype"))
        seen.setdefault(variant, set()).add((config["temperature"], config["dtype"]))
    axes = {(t, d) for t in (1.0, 2.0) for d in ("bfloat16", "float32")}
    assert len(seen) > 100
    partial = [v for v, got in seen.items() if got != axes]
    assert not partial, partial[:5]


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
    # With the teacher's lse at T given, pass 1 reads the student alone: 3 exps at T = 2 too.
    given = [r for r in dense_t2 if r["config"]["teacher_lse"]]
    assert given and all(r["ex2_per_element"] == 3 for r in given)


def test_whole_tile_loops_are_pipelined_with_asynchronous_copies(compiled):
    for arch in (90, 80):
        kd = [r for r in compiled[arch] if r["config"]["kernel"] != "grad_scale"]
        assert kd
        for r in kd:
            # pass 1 and pass 2; each loop's SASS issues the copies of later tiles (LDGSTS)
            assert r["whole_tile_loops"] == 2, r["config"]
            assert r["pipelined_loops"] >= 2, (r["config"], r["loop_async_copies"])


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
        # plain 16-byte loads, or 16-byte asynchronous copies (the pipelined tile loops)
        wide = [op for op in r["loads"] if op.startswith("LDG") and op.endswith(".128")]
        assert wide, (r["config"], r["loads"])
        # the gradient's 16-byte stores, with or without the evict_first hint (STG.E.EF.128)
        assert any(op.endswith(".128") for op in r["stores"]), (r["config"], r["stores"])


def test_a_stack_frame_one_block_per_sm_or_an_unpipelined_loop_fails_the_check():
    from fastkd.bench.compile import Result, problems
    from fastkd.bench.compile_configs import Config

    config = Config("partitioned", 4096, 32000, teacher="dense-bfloat16", mode="live")
    good = Result(config, 90, registers=80, num_warps=8, blocks_per_sm=3, whole_tile_loops=2)
    good.loop_async_copies = [2, 0, 4, 0]
    assert problems([good]) == []
    stack = dataclasses.replace(good, stack_bytes=8)  # ptxas's stack frame, no spill counted
    crowded = dataclasses.replace(good, registers=192, blocks_per_sm=1)
    unpipelined = dataclasses.replace(good, loop_async_copies=[0, 0, 4, 0])
    found = problems([stack, crowded, unpipelined])
    assert len(found) == 3
    assert "8 B stack" in found[0] and "1 block(s) per SM" in found[1]
    assert "2 whole-tile loops, 1 issue asynchronous copies" in found[2]


def test_configurations_compiled_to_one_kernel_share_one_compile_and_its_record(compiled):
    fields = ("registers", "stack_bytes", "blocks_per_sm", "loads", "stores", "loop_async_copies")
    for arch in (90, 80):
        by_kernel: dict[str, list[dict]] = {}
        for r in compiled[arch]:
            by_kernel.setdefault(r["kernel_hash"], []).append(r)
        # 634 configurations, under half as many kernels (shapes are not specialised on)
        assert len(by_kernel) < len(compiled[arch]) / 2
        for records in by_kernel.values():
            assert sum(1 for r in records if r["compile_seconds"] > 0) == 1  # compiled once
            assert all([r[f] for f in fields] == [records[0][f] for f in fields] for r in records)
        # the same launch at 4096 x 32000 and 8192 x 128256 is one kernel
        shapes = {
            (r["config"]["rows"], r["config"]["classes"]): r["kernel_hash"]
            for r in compiled[arch]
            if r["config"]["kernel"] == "bidirectional"
            and r["config"]["models"] == 3
            and r["config"]["temperature"] == 1.0
            and r["config"]["stop_grad"]
            and r["config"]["dtype"] == "bfloat16"
        }
        assert shapes[(4096, 32000)] == shapes[(8192, 128256)]


def test_the_row_loop_around_the_tile_loops_is_not_a_tile_loop():
    from fastkd.bench.compile_sass import loop_async_copies, loop_exps, whole_tile_loops

    ttgir = "\n".join(
        [
            "scf.for %row = %1 to %3 step %4  : i64 {",  # the row loop
            "  %t:2 = scf.for %i = %c0_i64 to %full_tiles step %c1_i64 iter_args(...) -> (f32) {",
            "    %e = math.exp2 %x : tensor<1024xf32, #blocked>",
            "  }",
            "  %m = math.exp2 %y : tensor<1024xf32, #blocked>",  # a masked end: not counted
            "  scf.for %part = %c0_i32 to %c2_i32 step %c1_i32  : i32 {",  # two trips
            "    %n = math.exp2 %z : tensor<1024xf32, #blocked>",
            "  }",
            "  %p = scf.for %j = %c0_i64 to %full_tiles step %c1_i64 iter_args(...) -> (f32) {",
            "    %a = math.exp2 %u : tensor<1024xf32, #blocked>",
            "    %b = math.exp %v : tensor<1024xf32, #blocked>",
            "  }",
            "}",
        ]
    )
    assert whole_tile_loops(ttgir) == 2
    assert loop_exps(ttgir) == 3
    sass = "\n".join(
        f"        /*{address:04x}*/                   {text} ;"
        for address, text in [
            (0x10, "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"),  # the row loop's start
            (0x20, "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]"),  # pass 1's tile loop
            (0x30, "@P0 BRA 0x20"),
            (0x40, "FADD R1, R2, R3"),  # pass 2's tile loop, no copies
            (0x50, "@P1 BRA 0x40"),
            (0x60, "@P2 BRA 0x10"),  # back to the next row
        ]
    )
    assert loop_async_copies(sass) == [1, 0]
