"""fastkd: offline, role-agnostic knowledge transfer across a pool of pretrained models."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# The root-level kernels/ and cli/ folders are the subpackages fastkd.kernels and fastkd.cli
# (pyproject maps them). When the source tree is used without installing (PYTHONPATH=repo, as on
# a lent GPU machine), let this package's search path include the repo root so they still resolve.
_root = _Path(__file__).resolve().parent.parent
if (_root / "kernels" / "__init__.py").is_file() and str(_root) not in __path__:
    __path__.append(str(_root))
