"""fastkd's version: the installed distribution's (pyproject.toml is its one home).

Its own module, importing nothing of fastkd, so that a store's manifest can record the version
that wrote it without importing the package root.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastkd")
except PackageNotFoundError:  # a checkout used without installing it (pip install -e .)
    __version__ = "0+unknown"
