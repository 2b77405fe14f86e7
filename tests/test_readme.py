"""The README's "Using it on your data" runs as it is: every command and snippet, in order.

Commands run in-process in a scratch folder (``fastkd ...`` through the typer app,
``python examples/X.py ...`` through runpy, ```` ```python ```` blocks through ``exec``), so
torch and timm are imported once. A command is one line after joining ``\\`` continuations and
dropping ``#`` comments; shell syntax beyond quoting (pipes, redirects, variables) is refused, so
what the README shows is exactly what ran.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastkd.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Using it on your data"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return FENCE.findall(text[start : end if end >= 0 else None])


def commands(code: str) -> list[list[str]]:
    """The shell block's commands as argument lists."""
    lines = re.sub(r"\\\n", " ", code).splitlines()
    found = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words:
            shell = [w for w in words if w in ("|", ">", ">>", "&&", ";") or w.startswith("$")]
            assert not shell, f"shell syntax the test cannot run as written: {line}"
            found.append(words)
    return found


def run_command(words: list[str]) -> None:
    if words[0] == "fastkd":
        result = CliRunner().invoke(app, words[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{shlex.join(words)}\n{result.output[-4000:]}"
    elif words[:2] == ["python", words[1]] and words[1].startswith("examples/"):
        saved = sys.argv
        sys.argv = [str(ROOT / words[1]), *words[2:]]
        try:
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")
        finally:
            sys.argv = saved
    else:
        raise AssertionError(f"the README test cannot run {shlex.join(words)}")


def test_the_section_has_the_api_presets_and_shards() -> None:
    blocks = section_blocks()
    shell = " ".join(code for language, code in blocks if language == "bash")
    python = " ".join(code for language, code in blocks if language == "python")
    assert {language for language, _ in blocks} == {"bash", "python"}
    assert "--preset kl-dp" in shell and "--preset bi-kd" in shell
    assert ".tar'" in shell
    assert "fastkd.partitioned_kd_loss" in python or "fastkd.PartitionedKDLoss" in python


def test_every_command_and_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a user on a CPU runs them: the kernels take their torch reference (the Triton
    interpreter, which the kernel tests run, would make this test minutes longer)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for language, code in section_blocks():
        if language == "bash":
            for words in commands(code):
                run_command(words)
        else:
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    work = tmp_path / "work"
    for made in (
        "store.zarr", "shards.zarr", "runs/all/report.json", "runs/kl-dp/vit.pt",
        "runs/bi-kd/summary.csv", "runs/shards/vit.pt", "eval/report.json", "own.pt",
    ):  # fmt: skip
        assert (work / made).exists(), made
