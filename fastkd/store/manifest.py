"""What a store holds and how it was made: the manifest, the layout, and comparing them.

The manifest (the group attribute ``fastkd``) is the store's contract with its readers: the pool,
the data set's fingerprint and classes, the views and their augmentation. Writers resume only into
a store whose manifest equals theirs, and training reads only a store that meets its
``Expectation``; both refuse with the list of differences, so this module also holds the
JSON-normal form and the field-by-field comparison they share. It needs nothing else of the
package but ``schema``, which a stored manifest passes (types, ranges, keys) before it becomes a
``Manifest``: every other module starts from a manifest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import zarr

from fastkd.augment import AugmentConfig
from fastkd.compression import MAX_TAIL_SAMPLES, TailModel
from fastkd.errors import ConfigError, StoreError, StoreMismatchError
from fastkd.runtime import plain
from fastkd.storage import Location, as_location
from fastkd.store.schema import MAX_BLOCKS, MAX_SAMPLES, brief, manifest_problems, one_line
from fastkd.version import __version__

FORMAT_VERSION = 4  # 4: files' content hashes; 3: block content hashes; 2: log-probabilities,
# exact tail masses, tail models; 1: logits + lse
MANIFEST_ATTR = "fastkd"  # group attribute holding the manifest (and the layout)
STATUS_ATTR = "fastkd_status"  # group attribute written once every block is done

TARGET_VIEWS_PER_SHARD = 8192  # default block: about this many (sample, view) rows
CHUNK_SAMPLES = 256  # inner chunk of the sharding codec: plain zarr reads a quarter shard or less

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ModelEntry:
    """One pool member, in the manifest."""

    name: str  # pool key, unique in the store; also its group name under models/
    arch: str  # timm name
    checkpoint_sha256: str | None
    # timm's resolved data config (input_size, interpolation, mean, std, crop_pct)
    data_config: dict
    num_classes: int
    topk: int  # stored top-k; 0 = dense (every class's log-probability in fp16)
    tail: TailModel | None = None  # sparse: how training reads the classes outside the top-k
    tail_samples: int = 0  # sampled tail: draws stored per view

    def __post_init__(self) -> None:
        if self.tail is not None and self.tail in set(TailModel):  # else named by Manifest
            self.tail = TailModel(self.tail)


@dataclass
class Manifest:
    """What a store holds and how it was made; stored as the group attribute ``fastkd``."""

    models: list[ModelEntry]
    num_samples: int
    views: int
    seed: int
    augment: dict  # dataclasses.asdict(AugmentConfig); an AugmentConfig is converted
    fingerprint: str  # data set fingerprint: sha256 of sorted (key, file size)
    classes: list[str]
    num_classes: int
    format_version: int = FORMAT_VERSION
    fastkd_version: str = __version__

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelEntry) else ModelEntry(**m) for m in self.models]
        if isinstance(self.augment, AugmentConfig):
            self.augment = asdict(self.augment)
        self.augment = plain(self.augment)
        problems = []
        if not self.models:
            problems.append("the pool has no model")
        names = [m.name for m in self.models]
        for name in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"model name {name!r} appears twice (names must be unique)")
        for m in self.models:
            if not _NAME_PATTERN.match(m.name):
                problems.append(
                    f"model name {m.name!r} must match {_NAME_PATTERN.pattern} (it names a group)"
                )
            if m.num_classes != self.num_classes:
                problems.append(
                    f"model {m.name!r} has {m.num_classes} classes, the data set {self.num_classes}"
                )
            if not 0 <= m.topk < m.num_classes:
                problems.append(
                    f"model {m.name!r}: topk must be 0 (dense) or in [1, {m.num_classes}), "
                    f"got {m.topk} (use resolve_topk)"
                )
            problems.extend(_tail_problems(m))
        if self.classes and len(self.classes) != self.num_classes:
            problems.append(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if not 1 <= self.num_samples <= MAX_SAMPLES or self.views < 1:
            problems.append(
                f"need 1 <= num_samples <= {MAX_SAMPLES:,} and views >= 1, got "
                f"{self.num_samples}, {self.views}"
            )
        if problems:
            raise ConfigError("invalid manifest: " + "; ".join(problems))

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(
            f"model {name!r} is not in the store (it has {[m.name for m in self.models]})"
        )

    def to_dict(self) -> dict:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _tail_problems(entry: ModelEntry) -> list[str]:
    """What is wrong with a model's tail fields (none for a dense model, one model if sparse)."""
    where = f"model {entry.name!r}"
    if entry.topk == 0:
        if entry.tail is not None or entry.tail_samples:
            return [f"{where} is dense: it has no tail (tail None, tail_samples 0)"]
        return []
    tails = [t.value for t in TailModel]
    if entry.tail not in tails:
        return [f"{where}: tail must be one of {', '.join(tails)}, got {entry.tail!r}"]
    sampled = entry.tail == TailModel.SAMPLED.value
    if sampled != (entry.tail_samples > 0) or not 0 <= entry.tail_samples <= MAX_TAIL_SAMPLES:
        return [
            f"{where}: tail_samples must be in [1, {MAX_TAIL_SAMPLES}] exactly for the sampled "
            f"tail (0 otherwise), got {entry.tail_samples}"
        ]
    return []


@dataclass(frozen=True)
class StoreLayout:
    """How samples map to shards (blocks) and inner chunks; stored under the manifest's ``layout``."""

    samples_per_shard: int
    chunk_samples: int  # inner chunk of the sharding codec, along the sample axis
    num_blocks: int

    def block_samples(self, block: int, num_samples: int) -> tuple[int, int]:
        """Samples ``[start, stop)`` of ``block`` (the last block may be short)."""
        start = block * self.samples_per_shard
        return start, min(start + self.samples_per_shard, num_samples)

    @classmethod
    def for_store(cls, num_samples: int, views: int, samples_per_shard: int | None) -> StoreLayout:
        """Shards of ``samples_per_shard`` samples (default: ``default_samples_per_shard``), inner
        chunks of ``CHUNK_SAMPLES`` when that divides the shard, else one chunk per shard."""
        if samples_per_shard is None:
            samples_per_shard = min(default_samples_per_shard(views), _round_up_pow2(num_samples))
        if samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        num_blocks = -(-num_samples // samples_per_shard)
        if num_blocks > MAX_BLOCKS:
            raise ConfigError(
                f"samples_per_shard {samples_per_shard} cuts {num_samples:,} samples into "
                f"{num_blocks:,} blocks, more than a store may have ({MAX_BLOCKS:,}); use larger "
                "shards"
            )
        divides = samples_per_shard % CHUNK_SAMPLES == 0
        return cls(
            samples_per_shard=samples_per_shard,
            chunk_samples=CHUNK_SAMPLES if divides else samples_per_shard,
            num_blocks=num_blocks,
        )


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_samples_per_shard(views: int) -> int:
    """The largest power of two at most ``TARGET_VIEWS_PER_SHARD / views`` samples (at least 1)."""
    return 1 << max(0, int(math.log2(max(1, TARGET_VIEWS_PER_SHARD // max(1, views)))))


# ----------------------------------------------------------------------------------------------
# JSON-normal values and their differences


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON values, floats to 1e-6 relative (configs pass through float32 sometimes)."""
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def json_differences(stored: Any, wanted: Any, where: str = "") -> list[str]:
    """Human-readable paths where two JSON values differ: ``field: store has X, expected Y``."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in [*stored, *(k for k in wanted if k not in stored)]:
            out += json_differences(
                stored.get(key), wanted.get(key), f"{where}.{key}" if where else key
            )
        return out
    if _same(stored, wanted):
        return []
    return [f"{where}: store has {brief(stored)}, expected {brief(wanted)}"]


def _model_differences(stored: list[dict], wanted: list[dict]) -> list[str]:
    """Pool differences keyed by model name (not list position)."""
    have, want = {m["name"]: m for m in stored}, {m["name"]: m for m in wanted}
    out = []
    if list(have) != list(want):
        out.append(f"models: store has {list(have)}, expected {list(want)}")
    for name in have.keys() & want.keys():
        out += json_differences(have[name], want[name], f"models[{name}]")
    return out


def manifest_differences(stored: Manifest, wanted: Manifest) -> list[str]:
    """Every field where two manifests differ, except the fastkd version that wrote them."""
    a, b = stored.to_dict(), wanted.to_dict()
    for d in (a, b):
        d.pop("fastkd_version")
        if d["classes"] == [str(c) for c in range(len(d["classes"]))]:
            d["classes"] = []  # named by index: earlier stores of file lists and shards list them
    return _model_differences(a.pop("models"), b.pop("models")) + json_differences(a, b)


@dataclass
class Expectation:
    """What training asks of a store; ``None`` fields are not checked."""

    fingerprint: str | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    models: list[str] | None = None  # model names that must be in the store
    data_configs: dict[str, dict] | None = None  # model name -> timm data config it must have
    checkpoints: dict[str, str] | None = None  # model name -> checkpoint sha256 it must have
    views: int | None = None
    seed: int | None = None
    augment: dict | None = None

    def differences(self, manifest: Manifest) -> list[str]:
        """``field: store has X, expected Y`` for each field that does not match."""
        out = []
        for name in ("fingerprint", "num_classes", "classes", "views", "seed", "augment"):
            want = getattr(self, name)
            if want is not None:
                out += json_differences(plain(getattr(manifest, name)), plain(want), name)
        names = [m.name for m in manifest.models]
        missing = [m for m in self.models or () if m not in names]
        if missing:
            out.append(f"models: store has {names}, expected it to contain {missing}")
        for name, config in (self.data_configs or {}).items():
            if name not in names:
                out.append(f"data_config of {name!r}: the store has no model {name!r} ({names})")
                continue
            stored = plain(manifest.model(name).data_config)
            want = plain(config)
            for key in want:
                out += json_differences(
                    stored.get(key), want[key], f"models[{name}].data_config.{key}"
                )
        for name, sha in (self.checkpoints or {}).items():
            if name not in names:
                out.append(f"checkpoint of {name!r}: the store has no model {name!r} ({names})")
            elif manifest.model(name).checkpoint_sha256 != sha:
                stored = manifest.model(name).checkpoint_sha256
                out.append(
                    f"models[{name}].checkpoint_sha256: store has {stored!r}, expected {sha!r}"
                )
        return out


# ----------------------------------------------------------------------------------------------
# The manifest of a store on disk


def open_group(path: Path | str | Location, mode: str = "r") -> zarr.Group:
    """The store's zarr group, wherever it lies (a local folder, an ``s3://`` prefix)."""
    store = as_location(path).zarr_store(read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3)


def read_config(path: Path | str | Location) -> dict | None:
    """The manifest attribute of the zarr group at ``path``, or None when there is none."""
    try:
        group = open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    return group.attrs.get(MANIFEST_ATTR)


def parse_config(path: Path | str | Location, config: Any) -> tuple[Manifest, StoreLayout]:
    """Manifest and layout of a stored manifest attribute. Another format version is refused
    first (``StoreMismatchError``), then a manifest that fails its schema or the ``Manifest``
    checks (``StoreError``, every problem named by its field's path, in one line)."""
    version = config.get("format_version") if isinstance(config, Mapping) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != FORMAT_VERSION:
        raise StoreMismatchError(
            path,
            [f"format_version: store has {version!r}, expected {FORMAT_VERSION}"],
            "this fastkd version cannot use it; dump the pool again (--overwrite) to rewrite it"
            if version < FORMAT_VERSION
            else "it was made by a newer fastkd; upgrade fastkd to read it",
        )
    problems = manifest_problems(config)
    if not problems:
        config = dict(config)
        layout = StoreLayout(**config.pop("layout"))
        try:
            return Manifest.from_dict(config), layout
        except ConfigError as error:  # the pool's own rules (names, classes, tails)
            problems = [str(error).removeprefix("invalid manifest: ")]
    raise StoreError(
        f"store {path} has an invalid manifest (the {MANIFEST_ATTR!r} attribute of its "
        f"zarr.json): {one_line(problems)}; dump the pool again with --overwrite to rewrite it"
    )


def open_manifest(path: Path | str | Location) -> tuple[Manifest, StoreLayout]:
    """The manifest and layout of the store at ``path`` (any fastkd store, finished or not)."""
    path = as_location(path)
    config = read_config(path)
    if config is None:
        raise StoreError(
            f"{path} is not a fastkd store (no zarr group with a {MANIFEST_ATTR!r} manifest)"
        )
    return parse_config(path, config)
