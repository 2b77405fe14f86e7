"""Model specs as given on the command line: ``[alias:]ARCH[=CKPT]``, and a pool's unique names.

Parsing a spec reads no file and builds no model, so this module imports neither torch nor timm:
the CLI and the configs check specs at once; ``fastkd.models`` builds what they name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastkd.errors import ConfigError

_TIMM_SOURCES = ("hf-hub", "hf_hub", "local-dir")  # timm's own "source:" name prefixes


@dataclass(frozen=True)
class ModelSpec:
    """One pool member as given on the command line: ``[alias:]NAME[=CKPT]``.

    ``arch`` is a timm model name (``hf-hub:`` and ``local-dir:`` names included), ``checkpoint``
    an optional weights file, ``name`` the member's key in the store: the alias if given, else
    the checkpoint's stem, else the architecture.
    """

    arch: str
    checkpoint: Path | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.arch:
            raise ConfigError("model spec has an empty architecture name")
        if not self.name:
            default = self.checkpoint.stem if self.checkpoint else self.arch.rsplit("/", 1)[-1]
            object.__setattr__(self, "name", default)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``resnet18``, ``resnet18=ckpt.pt``, ``teacher:resnet18=ckpt.pt``, ``hf-hub:timm/x``."""
        alias, arch, checkpoint = _split_spec(text)
        return cls(arch=arch, checkpoint=checkpoint, name=alias)


def _split_spec(text: str) -> tuple[str, str, Path | None]:
    """``[alias:]NAME[=CKPT]`` -> (alias or "", NAME, CKPT or None); timm's ``hf-hub:`` stays."""
    text = text.strip()
    arch, sep, checkpoint = text.partition("=")
    if sep and not checkpoint:
        raise ConfigError(f"model spec {text!r}: empty checkpoint path after '='")
    alias = ""
    prefix, colon, rest = arch.partition(":")
    if colon and prefix.lower() not in _TIMM_SOURCES:
        alias, arch = prefix, rest
        if not alias:
            raise ConfigError(f"model spec {text!r}: empty alias before ':'")
    if not arch:
        raise ConfigError(f"model spec {text!r}: no model name (expected [alias:]NAME[=CKPT])")
    return alias, arch, Path(checkpoint) if sep else None


def parse_pool(texts: Iterable[str]) -> list[ModelSpec]:
    """Parse the pool's specs and give every member a unique store name.

    Derived names (checkpoint stem or architecture) that collide get ``-2``, ``-3``, ... in order;
    an alias is kept as given, so an alias used twice, or equal to an earlier name, is an error.
    """
    specs: list[ModelSpec] = []
    taken: set[str] = set()
    for text in texts:
        alias, arch, checkpoint = _split_spec(text)
        spec = ModelSpec(arch=arch, checkpoint=checkpoint, name=alias)
        name = spec.name
        if name in taken:
            if alias:
                raise ConfigError(f"model alias {alias!r} names two members of the pool")
            suffix = 2
            while f"{name}-{suffix}" in taken:
                suffix += 1
            name = f"{name}-{suffix}"
        taken.add(name)
        specs.append(ModelSpec(arch=arch, checkpoint=checkpoint, name=name))
    if not specs:
        raise ConfigError("the pool is empty: give at least one model")
    return specs
