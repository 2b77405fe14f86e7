"""fastkd: offline, role-agnostic knowledge transfer across a pool of pretrained models.

The root-level folders kernels/, cli/ and bench/ are the subpackages fastkd.kernels, fastkd.cli
and fastkd.bench (pyproject.toml maps them), so use an installed checkout: ``pip install -e .``
(``--no-deps --no-build-isolation`` where there is no network).
"""

__version__ = "0.1.0"
