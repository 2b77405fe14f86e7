"""The README's demo figures are the committed results' own, and those results recompute.

The README quotes ``bench/results/demo-cpu.json`` (the default demo) and
``bench/results/demo-cpu-seeds3.json`` (three transfer seeds per fold); every line and table it
quotes is rendered from the JSON by ``fastkd.bench.demo_readme`` and must appear verbatim in the
README's demo section. Each saved report recomputes, from its per-image predictions alone, to
the numbers it holds (``DemoReport.recompute``, what ``fastkd demo --report-from`` runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastkd.bench.demo_readme import quoted
from fastkd.demo import DemoReport

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ["demo-cpu.json", "demo-cpu-seeds3.json"]
SECTION = "## What the demo shows"


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    return text[start : text.index("\n## ", start + len(SECTION))]


@pytest.mark.parametrize("name", RESULTS)
def test_the_readme_quotes_the_committed_result(name):
    saved = json.loads((ROOT / "bench" / "results" / name).read_text())
    section = _section()
    assert f"bench/results/{name}" in section
    for text in quoted(saved):
        assert text in section, f"README does not quote {name} as it is:\n{text}"


@pytest.mark.parametrize("name", RESULTS)
def test_the_committed_result_recomputes_from_its_predictions(name):
    saved = json.loads((ROOT / "bench" / "results" / name).read_text())
    again = DemoReport.recompute(saved)
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(saved["summary"], sort_keys=True)
    seeds = len(saved["config"]["seeds"])
    for question in again.summary["questions"]:
        assert question["difference"]["seeds"] == seeds  # resampled when > 1
    assert saved["provenance"]["git"]["sources_differ_from_commit"] is False
