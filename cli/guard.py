"""One guard for every command: bad input becomes one line on stderr and one exit code.

``FastKDError`` (the library's errors, each naming the file, sample or argument) and ``OSError``
(whose message names the file) are the user's to fix, so a traceback would only bury the message.
They are found where libraries hide them too: ``torch.save`` on a full disk raises a RuntimeError
over the OSError, task groups raise ExceptionGroups (``find_cause``), and a background thread
(the store's claim heartbeat) would print its own traceback. Any other exception is a bug and
keeps its traceback; ``fastkd --debug`` shows the traceback of every error.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fastkd.errors import USER_ERROR_EXIT, BadImageError, FastKDError, find_cause, is_disk_full
from fastkd.storage.objects import storage_failure

R = TypeVar("R")
USER_ERRORS = (FastKDError, OSError)
_FLOW = (typer.Exit, typer.Abort, typer.TyperException)  # usage errors, --help, exits
_CONTEXT = "_guard_context"  # the context parameter the guard adds to a command

# What a full disk leaves behind, per command, and how to go on once space is freed.
_AFTER_DISK_FULL = {
    "dump": "the store stays consistent (a block counts only once written whole): free some "
    "space and run the same command again to resume the dump",
    "train": "the checkpoints written so far are kept: free some space and run the same "
    "command with --resume to continue",
    "demo": "finished stages are kept: free some space and run the same command again to "
    "reuse them",
}

# Hints that name a command's own options, added to a library error where that command ran (the
# library's message cannot know which command, and so which options, the user has).
_SKIP_BAD_IMAGES = "or skip unreadable images: --on-bad-image skip (the store flags them)"
_HINTS: dict[str, tuple[tuple[type[BaseException], str], ...]] = {
    "dump": ((BadImageError, _SKIP_BAD_IMAGES),),
}


def guarded(command: Callable[..., R]) -> Callable[..., R]:
    """``command`` with bad input reported as ``error: <message>`` on stderr, exit code
    ``USER_ERROR_EXIT``. typer reads the wrapped signature for the options, plus a context
    parameter (unless the command has one): the guard reads --debug and the command's name."""
    signature = inspect.signature(command, eval_str=True)
    own = [name for name, p in signature.parameters.items() if p.annotation is typer.Context]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> R:
        context: typer.Context = kwargs[own[0]] if own else kwargs.pop(_CONTEXT)
        if context.find_root().params.get("debug"):
            return command(*args, **kwargs)
        with _thread_errors() as background:
            try:
                result = command(*args, **kwargs)
            except _FLOW:
                raise
            except Exception as error:
                found = find_cause(error, USER_ERRORS) or storage_failure(error)
                if found is None:
                    raise
                _print("error: ", "bold red", describe(found, error, context))
                raise typer.Exit(USER_ERROR_EXIT) from None
        for error in background:
            _print("warning: ", "bold yellow", f"a background thread stopped: {error}")
        return result

    if not own:
        added = inspect.Parameter(
            _CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context
        )
        run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), added])
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
    return run


def describe(found: BaseException, raised: BaseException, context: typer.Context) -> str:
    """The one-line message of a user error; a full disk names the path and what is kept, and a
    command adds the hints that name its own options (``_HINTS``)."""
    if not is_disk_full(found):
        hints = _HINTS.get(_command_name(context), ())
        return "; ".join([str(found), *(hint for kind, hint in hints if isinstance(found, kind))])
    assert isinstance(found, OSError)
    reason = "no space left on device" if found.strerror is None else found.strerror.lower()
    path = _written_path(found, raised) or context.params.get("out")
    where = f" writing {path}" if path is not None else ""
    after = _AFTER_DISK_FULL.get(_command_name(context), "free some space and run it again")
    return f"{reason}{where}: the disk is full; {after}"


def _command_name(context: typer.Context) -> str:
    """The running command without the program's name: ``dump``, ``bench dump``."""
    names = []
    while context.parent is not None:
        names.append(context.info_name or "")
        context = context.parent
    return " ".join(reversed(names))


def _written_path(*errors: BaseException) -> str | None:
    """The file an OSError was about: its filename, else the path the innermost frame that
    held one was writing (``write()`` on a full disk raises an OSError without a filename)."""
    for error in errors:
        if isinstance(error, OSError) and error.filename is not None:
            return os.fsdecode(error.filename)
    for error in errors:
        for frame_locals in _frames_innermost_first(error.__traceback__):
            for name, value in frame_locals.items():
                if (name == "path" or name.endswith("_path")) and isinstance(value, str | Path):
                    return str(value)
    return None


def _frames_innermost_first(tb: TracebackType | None) -> Iterator[dict[str, Any]]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_locals)
        tb = tb.tb_next
    return reversed(frames)


@contextlib.contextmanager
def _thread_errors() -> Iterator[list[BaseException]]:
    """Collect the user errors that end background threads instead of printing their traceback
    (``threading.excepthook``); the main thread's own message, or a warning, reports them."""
    collected: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        found = None if args.exc_value is None else find_cause(args.exc_value, USER_ERRORS)
        if found is None:
            previous(args)
        else:
            collected.append(found)

    threading.excepthook = hook
    try:
        yield collected
    finally:
        threading.excepthook = previous


def _print(prefix: str, style: str, message: str) -> None:
    """One line on stderr; ``Text``, so square brackets in names and paths stay as they are."""
    line = Text(prefix, style=style)
    line.append(message)
    Console(stderr=True, soft_wrap=True).print(line)
