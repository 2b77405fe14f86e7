"""The README's demo figures, written from a demo's saved report (``report.json``).

The README quotes the committed ``bench/results/demo-cpu*.json``; ``python -m
fastkd.bench.demo_readme FILE`` prints the tables it quotes, and tests/test_readme_demo.py holds
the README to them, so a quoted number cannot drift from the result it cites.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastkd.demo.config import ARMS_BY_NAME


def _interval(d: Mapping[str, float]) -> str:
    return f"[{d['low']:+.2f}, {d['high']:+.2f}]"


def measured_line(saved: Mapping[str, Any]) -> str:
    """Where the figures come from: the commit, the seeds, the wall time, the machine."""
    made = saved["provenance"]
    git = made.get("git") or {}
    commit = git.get("commit", "unknown")[:12]
    dirty = " (with uncommitted changes)" if git.get("sources_differ_from_commit") else ""
    s = saved["summary"]
    minutes, seconds = divmod(round(saved["seconds"]["total"]), 60)
    folds, seeds = len(s["folds"]), len(s["seeds"])
    return (
        f"Measured at commit {commit}{dirty}, code {made['code_version'][:12]}, on "
        f"{made['machine']}: {folds} fold{'s' * (folds > 1)} x {seeds} seed{'s' * (seeds > 1)} "
        f"per fold, {minutes} min {seconds:02d} s of wall time."
    )


def pool_line(saved: Mapping[str, Any]) -> str:
    top1 = saved["summary"]["top1_before"]
    names = " / ".join(top1)
    return f"The pool before transfer: {' / '.join(f'{v:.1f}' for v in top1.values())}% test " \
        f"top-1 ({names})."  # fmt: skip


def arms_table(saved: Mapping[str, Any]) -> str:
    """Each arm's mean change over the pool, its interval, and both success rates."""
    rows = [
        "| arm | pool change (points) | 95% interval | members beating CE fine-tuning | "
        "Roth's success rate | knowledge gain / loss (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm in saved["summary"]["arms"].items():
        members = arm["members"].values()
        gain = sum(m["knowledge_gain"] for m in members) / len(members)
        loss = sum(m["knowledge_loss"] for m in members) / len(members)
        beating = (
            "(control)"
            if arm["success_rate"] is None
            else f"{sum(m['success'] for m in members)} of {len(members)}"
        )
        rows.append(
            f"| {ARMS_BY_NAME[name].title} | {arm['pool_delta']['estimate']:+.2f} | "
            f"{_interval(arm['pool_delta'])} | {beating} | {arm['success_rate_roth']:.0f}% | "
            f"{gain:.1f} / {loss:.1f} |"
        )
    return "\n".join(rows)


def questions_table(saved: Mapping[str, Any]) -> str:
    """The declared questions: difference, interval, verdict, knowledge loss of both arms."""
    rows = [
        "| declared question | difference (points) | 95% interval | verdict | knowledge lost, "
        "arm / control (%) | difference in knowledge lost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for q in saved["summary"]["questions"]:
        d, lost = q["difference"], q["knowledge_loss"]
        rows.append(
            f"| {q['role']}: {ARMS_BY_NAME[q['arm']].title} minus "
            f"{ARMS_BY_NAME[q['control']].title} | {d['estimate']:+.2f} | {_interval(d)} | "
            f"{q['verdict']} | {lost['arm']:.2f} / {lost['control']:.2f} | "
            f"{lost['difference']['estimate']:+.2f} {_interval(lost['difference'])} |"
        )
    return "\n".join(rows)


def quoted(saved: Mapping[str, Any]) -> list[str]:
    """Every piece of text the README quotes from one result, in order."""
    return [measured_line(saved), pool_line(saved), arms_table(saved), questions_table(saved)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a demo's report.json")
    args = parser.parse_args(argv)
    print("\n\n".join(quoted(json.loads(args.report.read_text()))))


if __name__ == "__main__":
    main()
