"""One guard for every command: bad input becomes one line on stderr and one exit code.

``FastKDError`` (the library's errors, each naming the file, sample or argument) and ``OSError``
(whose message names the file) are the user's to fix, so a traceback would only bury the message;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fastkd.errors import USER_ERROR_EXIT, FastKDError

P = ParamSpec("P")
R = TypeVar("R")


def guarded(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` with bad input reported as ``error: <message>`` on stderr, exit code
    ``USER_ERROR_EXIT`` (typer reads the wrapped signature for the options)."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (FastKDError, OSError) as error:
            message = Text("error: ", style="bold red")
            message.append(str(error))
            Console(stderr=True, soft_wrap=True).print(message)
            raise typer.Exit(USER_ERROR_EXIT) from None

    return run
