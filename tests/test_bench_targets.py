"""`fastkd bench targets`: the synthetic part on a few rows, its JSON and what it must find.

The properties checked are ones the tail models guarantee, read from the benchmark's own output:
the stored dense target is the floor of every sparse one; the bucket's KL, the divergence of the
target and the student bucketed alike, is at most the dense KL at T = 1 (data processing); the
sampled tail is unbiased at T = 1, so the mean of its draws is nearer the dense gradient than one
draw; and on rows whose tail is far from flat, the bucket, which leaves the student's tail shape
free, errs less than the uniform tail, which imposes a flat one.
"""

from __future__ import annotations

import json

import pytest

from fastkd.bench import targets
from fastkd.compression import TailModel, raw_bytes_per_view
from fastkd.demo import DemoConfig, DemoLayout
from fastkd.errors import ConfigError


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-targets") / "targets.json"
    targets.main(
        ["--parts", "synthetic", "--rows", "64", "--temperatures", "1,2", "--draws", "4",
         "--out", str(out)]
    )  # fmt: skip
    return json.loads(out.read_text())


def _rows(result: dict, **match) -> list[dict]:
    rows = result["synthetic"]["results"]
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _one(result: dict, **match) -> dict:
    (row,) = _rows(result, **match)
    return row


def test_the_json_names_its_generators_budgets_and_settings(result):
    synthetic = result["synthetic"]
    assert result["machine"].startswith("CPU")
    assert (synthetic["rows"], synthetic["classes"]) == (64, 1000)
    assert synthetic["budgets_bytes"] == [24, 48]
    assert set(synthetic["generators"]) == {"ranked", "gaussian"}
    for generator in synthetic["generators"].values():
        assert generator["params"] and generator["formula"]
        entropy = generator["entropy_nats"]
        assert 0 <= entropy["min"] <= entropy["median"] <= entropy["max"]
    # Every setting at a budget stores at most that many raw bytes per view, within one class.
    for row in synthetic["results"]:
        tail = TailModel.BUCKET if row["tail"] == "dense" else TailModel(row["tail"])
        assert row["bytes"] == raw_bytes_per_view(1000, row["topk"], tail, row["tail_samples"])
        if row["budget_bytes"] is not None:
            assert row["budget_bytes"] - 4 < row["bytes"] <= row["budget_bytes"]
        for stat in ("kl_rel_error", "grad_rel_l2"):
            assert 0 <= row[stat]["median"] <= row[stat]["p90"]
        assert -1 <= row["grad_cosine"]["p10"] <= row["grad_cosine"]["median"] <= 1
    settings = {
        (r["budget_bytes"], r["tail"], r["topk"], r["tail_samples"])
        for r in _rows(result, generator="ranked", temperature=1.0)
    }
    assert {(24, "uniform", 3, 0), (24, "bucket", 3, 0), (24, "sampled", 2, 3)} <= settings
    assert {(48, "uniform", 9, 0), (48, "bucket", 9, 0), (48, "sampled", 5, 9)} <= settings
    assert (None, "dense", 0, 0) in settings
    # The ranking lists every setting of its budget, best first.
    for ranking in synthetic["ranking"]:
        errors = [error for _, error in ranking["by_median_grad_rel_l2"]]
        assert errors == sorted(errors)


def test_the_stored_dense_target_is_the_floor_of_every_sparse_one(result):
    for generator in ("ranked", "gaussian"):
        for temperature in (1.0, 2.0):
            rows = _rows(result, generator=generator, temperature=temperature)
            dense = _one(result, generator=generator, temperature=temperature, tail="dense")
            floor = dense["grad_rel_l2"]["median"]
            assert floor < 1e-2
            assert all(r["grad_rel_l2"]["median"] > floor for r in rows if r["tail"] != "dense")


def test_the_bucket_kl_is_at_most_the_dense_kl_at_t1(result):
    for generator in ("ranked", "gaussian"):
        for budget in (24, 48):
            row = _one(result, generator=generator, temperature=1.0, budget_bytes=budget,
                       tail="bucket")  # fmt: skip
            assert row["kl_signed_rel_error_median"] <= 1e-3


def test_the_mean_of_sampled_draws_is_nearer_the_dense_gradient_at_t1(result):
    for row in _rows(result, temperature=1.0, tail="sampled"):
        assert row["mean_of_draws"]["draws"] == 4
        averaged = row["mean_of_draws"]["grad_rel_l2_total"]
        assert averaged < row["grad_rel_l2_total"]


def test_the_bucket_beats_the_uniform_tail_on_ranked_rows_at_t2(result):
    for budget in (24, 48):
        bucket, uniform = (
            _one(result, generator="ranked", temperature=2.0, budget_bytes=budget, tail=tail)
            for tail in ("bucket", "uniform")
        )
        assert bucket["grad_rel_l2"]["median"] < uniform["grad_rel_l2"]["median"]


def test_a_budget_that_no_top_k_fits_is_refused():
    assert targets.budget_settings(14, 1000)[0].topk == 1  # 10 B fixed + one class
    with pytest.raises(SystemExit, match="budget 13 B: need at least 14 B"):
        targets.budget_settings(13, 1000)


def test_demo_stores_of_other_target_settings_live_in_other_folders(tmp_path):
    dense = DemoConfig(out_dir=tmp_path)
    settings = [
        dense,
        DemoConfig(out_dir=tmp_path, topk=3, tail="uniform"),
        DemoConfig(out_dir=tmp_path, topk=3, tail="bucket"),
        DemoConfig(out_dir=tmp_path, topk=3, tail="sampled", tail_samples=2),
        DemoConfig(out_dir=tmp_path, topk=3, tail="sampled", tail_samples=4),
    ]
    layouts = [DemoLayout.of(cfg) for cfg in settings]
    assert len({layout.store for layout in layouts}) == len(settings)
    assert len({layout.transfer(0, "live") for layout in layouts}) == len(settings)
    assert {layout.pool for layout in layouts} == {layouts[0].pool}  # one pool serves them all
    # tail_samples only matters to the sampled tail.
    same = DemoConfig(out_dir=tmp_path, topk=3, tail="bucket", tail_samples=2)
    assert DemoLayout.of(same).store == layouts[2].store


def test_demo_config_refuses_bad_target_settings(tmp_path):
    with pytest.raises(ConfigError, match="tail model"):
        DemoConfig(out_dir=tmp_path, topk=3, tail="gaussian")
    with pytest.raises(ConfigError, match="topk"):
        DemoConfig(out_dir=tmp_path, topk=-1)
    with pytest.raises(ConfigError, match="tail-samples"):
        DemoConfig(out_dir=tmp_path, topk=3, tail="sampled", tail_samples=0)
    assert DemoConfig(out_dir=tmp_path, topk=3, tail=TailModel.SAMPLED).tail == "sampled"
