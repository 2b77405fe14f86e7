"""The manifest attribute's schema: JSON types, ranges and keys, checked before anything uses it.

A store's manifest is JSON in its ``zarr.json``, which anyone can edit. Everything after the open
trusts a ``Manifest``, so the raw attribute is checked here first and every problem is named by
its path (``models[1].topk: expected an integer, got '5'``), never a TypeError deep in the code:
each field's JSON type (an integer is neither a bool nor a string), its range, required and
unknown keys, and the layout's agreement with ``num_samples``. The rules between the pool's
fields (unique names, class counts, tails) stay ``Manifest``'s; whether the arrays agree with the
manifest is ``arrays.array_differences``'s.

Unknown top-level keys are ignored, as ``Manifest.from_dict`` always has: a later fastkd may add
information there within a format version (a change that readers must understand gets a new
version). A model entry, the augmentation and the layout are closed: an unknown key there is a
typo, or a setting this fastkd would silently not apply.

The upper bounds turn absurd claims into one message instead of memory sized by them: the
reader keeps every sample's label, size, flag and file hash (25 B) and every block's hash row in
memory, and class ids are stored in 32 bits at most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastkd.augment import AugmentConfig
from fastkd.errors import ConfigError

INT64_MAX = 2**63 - 1  # numpy's shapes and indices
MAX_SAMPLES = 2**32  # above any image data set (JFT-3B); the reader keeps 25 B a sample
MAX_BLOCKS = 2**24  # a file per array and block; the reader keeps each block's hash row
MAX_CLASS_IDS = 2**32  # class ids are stored as uint16 or uint32 (encoding.id_dtype)
MAX_SHOWN = 12  # problems named in one message; the rest are counted


@dataclass(frozen=True)
class Int:
    """A JSON integer (not a bool) in ``[low, high]``."""

    low: int = 0
    high: int = INT64_MAX


@dataclass(frozen=True)
class Number:
    """A finite JSON number, integer or not (not a bool)."""


@dataclass(frozen=True)
class Str:
    nullable: bool = False


@dataclass(frozen=True)
class Bool:
    pass


@dataclass(frozen=True)
class List:
    item: Spec
    length: int | None = None  # exactly this many items; None: any number


@dataclass(frozen=True)
class Object:
    """A JSON object with these keys, each required; ``closed``: no other key. ``fields`` None:
    any object (keys are JSON strings anyway)."""

    fields: Mapping[str, Spec] | None = None
    closed: bool = True


Spec = Int | Number | Str | Bool | List | Object

# The manifest as ``arrays.create_store`` writes it: ``Manifest.to_dict()`` plus ``layout``
# (tests/test_manifest_schema.py holds these keys to the dataclasses' fields).
MODEL_ENTRY = Object(
    {
        "name": Str(),
        "arch": Str(),
        "checkpoint_sha256": Str(nullable=True),
        "data_config": Object(),  # timm's, whatever keys it has
        "num_classes": Int(1, MAX_CLASS_IDS),
        "topk": Int(0, MAX_CLASS_IDS),
        "tail": Str(nullable=True),
        "tail_samples": Int(),
    }
)
AUGMENT = Object(
    {
        "scale": List(Number(), 2),
        "ratio": List(Number(), 2),
        "hflip": Number(),
        "eval_view": Bool(),
        "eval_crop_pct": Number(),
    }
)
LAYOUT = Object(
    {
        "samples_per_shard": Int(1, MAX_SAMPLES),
        "chunk_samples": Int(1, MAX_SAMPLES),
        "num_blocks": Int(1, MAX_BLOCKS),
    }
)
MANIFEST = Object(
    {
        "format_version": Int(),
        "fastkd_version": Str(),
        "models": List(MODEL_ENTRY),
        "num_samples": Int(1, MAX_SAMPLES),
        "views": Int(1),
        "seed": Int(0, 2**64 - 1),  # the view replay's Philox key word
        "augment": AUGMENT,
        "fingerprint": Str(),
        "classes": List(Str()),
        "num_classes": Int(1, MAX_CLASS_IDS),
        "layout": LAYOUT,
    },
    closed=False,
)


def brief(value: Any, limit: int = 80) -> str:
    """``repr`` of a value, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(spec: Spec) -> str:
    if isinstance(spec, Str):
        return "a string or null" if spec.nullable else "a string"
    kinds = {Int: "an integer", Number: "a number", Bool: "true or false", List: "a list"}
    return kinds.get(type(spec), "an object")


def _type_ok(spec: Spec, value: Any) -> bool:
    if isinstance(spec, Int):
        return _is_int(value)
    if isinstance(spec, Number):
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(spec, Str):
        return isinstance(value, str) or (spec.nullable and value is None)
    if isinstance(spec, Bool):
        return isinstance(value, bool)
    if isinstance(spec, List):
        return isinstance(value, list)
    return isinstance(value, Mapping)


def problems(spec: Spec, value: Any, where: str) -> list[str]:
    """What is wrong with ``value`` by ``spec``: ``path: what``, one entry per problem."""
    if not _type_ok(spec, value):
        return [f"{where or 'manifest'}: expected {_kind(spec)}, got {brief(value)}"]
    if isinstance(spec, Int) and not spec.low <= value <= spec.high:
        bound = f">= {spec.low}" if value < spec.low else f"at most {spec.high:,}"
        return [f"{where}: must be {bound}, got {value:,}"]
    if isinstance(spec, List):
        if spec.length is not None and len(value) != spec.length:
            return [f"{where}: expected {spec.length} items, got {len(value)}"]
        items = (problems(spec.item, item, f"{where}[{i}]") for i, item in enumerate(value))
        return [found for of_item in items for found in of_item]
    if isinstance(spec, Object) and spec.fields is not None:
        found = []
        for key, field in spec.fields.items():
            path = f"{where}.{key}" if where else key
            if key not in value:
                found.append(f"{path}: missing")
            else:
                found += problems(field, value[key], path)
        if spec.closed:
            found += [f"{where}.{key}: unknown key" for key in value if key not in spec.fields]
        return found
    return []


def manifest_problems(config: Any) -> list[str]:
    """Every problem of a stored manifest attribute (``Manifest.to_dict()`` plus ``layout``):
    types, ranges and keys, then what ties its fields together (the layout's blocks and chunks,
    the augmentation's ranges) where those fields are well formed."""
    found = problems(MANIFEST, config, "")
    if not isinstance(config, Mapping):
        return found
    layout, samples = config.get("layout"), config.get("num_samples")
    if not problems(LAYOUT, layout, "layout") and not problems(Int(1, MAX_SAMPLES), samples, ""):
        found += _layout_problems(layout, samples)
    augment = config.get("augment")
    if not problems(AUGMENT, augment, "augment"):
        try:
            AugmentConfig.from_dict(augment)
        except ConfigError as error:
            found.append(f"augment: {error}")  # AugmentConfig's own ranges
    return found


def _layout_problems(layout: Mapping[str, int], num_samples: int) -> list[str]:
    """The layout against ``num_samples``: shards cut into whole inner chunks, one block a shard."""
    per_shard, chunk = layout["samples_per_shard"], layout["chunk_samples"]
    found = []
    if per_shard % chunk:
        found.append(
            f"layout.chunk_samples: {chunk} does not divide samples_per_shard {per_shard} (a "
            "shard holds whole inner chunks)"
        )
    blocks = -(-num_samples // per_shard)
    if layout["num_blocks"] != blocks:
        found.append(
            f"layout.num_blocks: {layout['num_blocks']:,}, but {num_samples:,} samples in shards "
            f"of {per_shard:,} make {blocks:,}"
        )
    return found


def one_line(found: list[str]) -> str:
    """The problems joined into one line, the first ``MAX_SHOWN`` named and the rest counted."""
    more = len(found) - MAX_SHOWN
    return "; ".join(found[:MAX_SHOWN]) + (f"; and {more} more" if more > 0 else "")
