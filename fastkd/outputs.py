"""Output folders: fastkd writes only into a folder that is new, empty, or one it made.

``--out`` is often typed by hand, and a wrong one (the data, the pool's checkpoints, a home
folder) must not lose a user's files to a checkpoint or a report of the same name. So a command
claims its output folder before it writes anything: a new or empty folder gets a marker file
(``.fastkd-output``, naming the command), a folder with the marker of the same command is
fastkd's to write into again, and anything else is refused naming the files that would be
replaced. A run or demo folder from before the marker (it holds what every one of them wrote
first) is adopted, so runs and demos made earlier still resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from fastkd.errors import ConfigError
from fastkd.files import atomic_write_text

MARKER = ".fastkd-output"
_RUN_FILES = ("state.pt", "history.json")  # what every training run wrote before the marker
_SHOWN = 5
_DESKTOP_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def claim_output_folder(folder: Path, command: str, writes: Iterable[str] = ()) -> None:
    """Make ``folder`` this command's output folder (``check_output_folder``, then the marker)."""
    if check_output_folder(folder, command, writes):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / MARKER, json.dumps({"command": command}) + "\n")


def check_output_folder(folder: Path, command: str, writes: Iterable[str] = ()) -> bool:
    """Whether ``folder`` may be ``command``'s output folder, reading only: True when it still
    needs the marker (new, empty, or a run from before the marker), False when it has it; a
    ``ConfigError`` when it holds files fastkd's ``command`` did not write. ``writes``: the names
    the command writes in it, named first in a refusal. Ranks of a job all check, then one marks."""
    folder, writes = Path(folder), set(writes)
    marked = owner(folder)
    if marked == command:
        return False
    if marked is not None:
        raise ConfigError(
            f"{folder} is the output folder of `fastkd {marked}`, not of `fastkd {command}`: "
            "choose another folder"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output folder {folder} is a file: choose a folder (new or empty)")
    listed = os.listdir(folder) if folder.exists() else []
    entries = sorted(name for name in listed if not _ignored(name))
    if entries and owner(folder) == command:  # another rank of the job marked it meanwhile
        return False
    if entries and not _made_before_the_marker(folder, command, entries, writes):
        raise ConfigError(_refusal(folder, command, entries, writes))
    return True


def _ignored(name: str) -> bool:
    """The temporary file of another rank's marker (``atomic_write``), or a file manager's
    metadata: nothing of the user's that a command could replace."""
    return name in _DESKTOP_FILES or (name.startswith(f".{MARKER}.") and name.endswith(".tmp"))


def _made_before_the_marker(
    folder: Path, command: str, entries: list[str], writes: set[str]
) -> bool:
    """A training run (or a folder of them, ``--all``) or a demo made before fastkd marked its
    folders: it holds only what the command writes (and the temporary files of a killed save),
    and what every one of them wrote first is there."""

    def is_run(path: Path) -> bool:
        return all((path / name).is_file() for name in _RUN_FILES)

    def written(name: str) -> bool:
        return name in writes or any(
            name.startswith(f".{w}.") and name.endswith(".tmp") for w in writes
        )

    if not all(written(name) for name in entries):
        return False
    if command == "train":
        return is_run(folder) or any(is_run(folder / name) for name in entries)
    if command == "demo":
        return (folder / "digits").is_dir() and (folder / "pool").is_dir()
    return False


def owner(folder: Path) -> str | None:
    """The command whose output folder ``folder`` is (its marker), or None."""
    try:
        text = (Path(folder) / MARKER).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        command = json.loads(text)["command"]
    except (ValueError, KeyError, TypeError):
        command = None
    if not isinstance(command, str):
        raise ConfigError(
            f"{Path(folder) / MARKER} is damaged (not fastkd's marker): remove it only if "
            "the folder holds nothing of yours"
        )
    return command


def _refusal(folder: Path, command: str, entries: list[str], writes: set[str]) -> str:
    """Why a folder with files fastkd did not write cannot be an output folder: the files the
    command would replace first, else what the folder holds."""
    replaced = [name for name in entries if name in writes]
    names = replaced or entries
    shown = ", ".join(str(folder / n) for n in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    what = "would replace" if replaced else "would write beside"
    return (
        f"output folder {folder} holds files fastkd did not write, and `fastkd {command}` "
        f"{what} {shown}{more}: give a new or empty folder (fastkd writes only there, or into "
        "a folder it made)"
    )


def check_not_input(output: Path, inputs: dict[str, Path | None]) -> None:
    """Refuse to write ``output`` where an input of the same command lies (``inputs``: what it
    is -> its path), e.g. a student's checkpoint in the folder its selected weights go to."""
    for what, path in inputs.items():
        if path is not None and _same_file(output, Path(path)):
            raise ConfigError(
                f"{output} would replace {what} ({path}), an input of this run: copy it "
                "elsewhere, or choose another --out"
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)
