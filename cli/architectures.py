"""The demo pool's timm architectures, registered before a command builds a model.

Importing ``fastkd.digits`` registers them with timm (``fastkd_mlp_mixer`` is not timm's own), so
that every command loads the demo's checkpoints. It imports timm, so the commands that build
models call this when they run, never at start-up: ``fastkd --help`` stays instant.
"""

from __future__ import annotations


def register_demo_architectures() -> None:
    """Make the demo pool's checkpoints loadable by ``fastkd dump``, ``train`` and ``eval``."""
    import fastkd.digits  # noqa: F401
