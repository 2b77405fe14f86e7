"""Every option explains itself, and every hint names an option the user has.

Each option of each command has help (typer adds the default; the help gives the unit). The
options that the messages and help texts of ``cli/`` and ``fastkd/`` name (``--something`` in
any string of their source) exist: on the command whose module the string is in, or on the
command the string names (``fastkd dump --repair``), or at least on some command.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fastkd.cli.guard import guarded
from fastkd.cli.main import app
from fastkd.errors import BadImageError

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("dump", "inspect", "train", "eval", "demo", "bench")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
NAMED_COMMAND = re.compile(r"fastkd (?:--debug )?(" + "|".join(COMMANDS) + r")\b")
FOREIGN = {  # other tools' options, named in docs and messages
    "--no-deps": "pip install",
    "--no-build-isolation": "pip install",
    "--nproc-per-node": "torchrun",
    "--porcelain": "git status (the demo's provenance)",
}
# Source files whose strings speak for one command: the option must be that command's.
OWNERS = {
    "cli/dump_cmd.py": "dump",
    "cli/inspect_cmd.py": "inspect",
    "cli/train_cmd.py": "train",
    "cli/eval_cmd.py": "eval",
    "cli/demo_cmd.py": "demo",
    "fastkd/dump/": "dump",
    "fastkd/training/": "train",
    "fastkd/evaluation.py": "eval",
}


def _commands() -> dict[str, object]:
    """Every command by its name (``bench dump`` for a sub-command), the root as ``""``."""
    found: dict[str, object] = {}

    def walk(command: object, name: str) -> None:
        found[name] = command
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{name} {sub_name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def _options(command: object) -> list:
    """The command's options (not its arguments, not --help)."""
    return [p for p in command.params if p.param_type_name == "option"]  # type: ignore[attr-defined]


def _names(command: object) -> set[str]:
    names = {"--help"}
    for option in _options(command):
        names.update(option.opts)
        names.update(option.secondary_opts)
    return names


COMMAND_OPTIONS = {name: _names(command) for name, command in _commands().items()}
ALL_OPTIONS = set().union(*COMMAND_OPTIONS.values())


@pytest.mark.parametrize("name", sorted(COMMAND_OPTIONS))
def test_every_option_has_help(name: str) -> None:
    command = _commands()[name]
    for option in _options(command):
        text = (option.help or "").strip()
        assert text, f"fastkd {name} {option.opts[0]} has no help"
        hidden_default = option.show_default is False and not option.required
        if hidden_default and not option.is_flag:
            assert "default" in text.lower() or "without" in text.lower(), (
                f"fastkd {name} {option.opts[0]}: its default is not shown, so its help must "
                "say what happens without it"
            )


def _strings(path: Path) -> Iterator[str]:
    """The string literals of a source file; an f-string as its literal parts joined."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.JoinedStr):
            yield "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _mentions() -> Iterator[tuple[str, str, str]]:
    """(source file, option, the string naming it) for every ``--option`` in cli/ and fastkd/."""
    for path in sorted([*(ROOT / "cli").glob("*.py"), *(ROOT / "fastkd").rglob("*.py")]):
        where = path.relative_to(ROOT).as_posix()
        for text in _strings(path):
            for option in OPTION.findall(text):
                yield where, option, text


def _owner(where: str) -> str | None:
    return next((cmd for prefix, cmd in OWNERS.items() if where.startswith(prefix)), None)


def test_every_hinted_option_exists() -> None:
    missing, elsewhere = [], []
    for where, option, text in _mentions():
        if option in FOREIGN:
            continue
        if option not in ALL_OPTIONS:
            missing.append(f"{where}: {option}")
            continue
        owner = _owner(where)
        if owner is None:
            continue
        allowed = COMMAND_OPTIONS[owner].union(
            *(COMMAND_OPTIONS[cmd] for cmd in NAMED_COMMAND.findall(text)), COMMAND_OPTIONS[""]
        )
        if option not in allowed:
            elsewhere.append(f"{where} ({owner}): {option} in {text[:80]!r}")
    assert not missing, f"options that no command has: {missing}"
    assert not elsewhere, f"options that the command a message belongs to lacks: {elsewhere}"


def test_only_the_commands_that_skip_bad_images_suggest_it() -> None:
    """A bad image in eval or train ends in a message that names no --on-bad-image (they have
    no such option); in dump, which has it, the message suggests it."""
    skipping = {name for name, options in COMMAND_OPTIONS.items() if "--on-bad-image" in options}
    assert "dump" in skipping

    def fail() -> None:
        raise BadImageError(Path("data/0/x.png"), 3, "truncated")

    probe = typer.Typer()
    for name in ("dump", "train", "eval"):
        probe.command(name)(guarded(fail))
    runner = CliRunner()
    for name in ("dump", "train", "eval"):
        result = runner.invoke(probe, [name])
        assert result.exit_code == 2
        assert "cannot read image data/0/x.png (sample 3)" in result.output
        assert ("--on-bad-image skip" in result.output) == (name in skipping), name
