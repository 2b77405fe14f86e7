"""The soft-target store: a sharded, compressed Zarr v3 group of per-(sample, view) pool outputs.

One home for the on-disk format (``docs/store-format.md`` describes it for plain-zarr readers):
the manifest, the encoding of full logits into top-k logits + ids + log-sum-exp + true-class
logit (or dense fp16 logits), the writer (blocks, resume, shard claims, locks) and the reader
(validation against what training expects, O(1) random access through a block cache).

Storing logits and the log-sum-exp of the full logits keeps the store temperature-agnostic; the
true-class logit makes ``p(y) = exp(true_logit - lse)`` exact even when ``y`` is outside the
top-k, so the partition rule (``fastkd.partition``) is exact on stored targets.

The unit of writing is a block: one shard along the sample axis, all views, all models. Ranks
write disjoint blocks; a block's arrays are written in full, then its marker in ``blocks_done``
(one unsharded chunk per block, so markers of different ranks never share a file). Resume
rewrites the blocks without a marker, so a block torn by a crash is simply written again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from fastkd import __version__
from fastkd.files import write_json
from fastkd.views import AugmentConfig, box_fractions, view_boxes

if TYPE_CHECKING:  # torch is imported where it is used: inspecting or reading needs only numpy
    import torch

    from fastkd.kernels.targets import PoolTargets

FORMAT_VERSION = 1
MANIFEST_ATTR = "fastkd"  # group attribute holding the manifest (and the layout)
STATUS_ATTR = "fastkd_status"  # group attribute written once every block is done

DENSE_MAX_CLASSES = 128  # at or below this many classes dense storage is the default
DENSE_SLACK = 1.25  # dense also wins when its raw bytes are within 25% of sparse's
TARGET_VIEWS_PER_SHARD = 8192  # default block: about this many (sample, view) rows
CHUNK_SAMPLES = 256  # inner chunk of the sharding codec: plain zarr reads a quarter shard or less
ZSTD_LEVEL = 9  # inside blosc and for keys; decoding speed hardly depends on it
DEFAULT_CACHE_BYTES = 4 << 30  # reader: decoded blocks kept in memory, all models together

HEARTBEAT_S = 30.0  # a writer refreshes its claim this often
CLAIM_STALE_S = 300.0  # a claim (or the creation lock) not refreshed for this long is dead
LOCK_WAIT_S = 900.0  # how long a rank waits for another to finish creating the store

_META_DIR = ".fastkd"  # inside the store, ignored by zarr: the creation lock and the claims
_CREATING = "creating"  # marker file: creation started and has not finished
_DONE_ARRAY = "blocks_done"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

SHARED_ARRAYS = ("keys", "labels", "sizes", "boxes", "flips", "skipped")


class StoreError(RuntimeError):
    """A store cannot be used as asked."""


class StoreMismatchError(StoreError, ValueError):
    """The store's configuration differs from the requested one; ``differences`` says how."""

    def __init__(self, path: Path | str, differences: Sequence[str], hint: str = "") -> None:
        self.path = Path(path)
        self.differences = list(differences)
        lines = "\n".join(f"  {d}" for d in self.differences)
        super().__init__(
            f"store {self.path} does not match:\n{lines}" + (f"\n{hint}" if hint else "")
        )


class StoreBusyError(StoreError):
    """Another live writer holds the store (an overlapping shard claim or the creation lock)."""


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ModelEntry:
    """One pool member, in the manifest."""

    name: str  # pool key, unique in the store; also its group name under models/
    arch: str  # timm name
    checkpoint_sha256: str | None
    # timm's resolved data config (input_size, interpolation, mean, std, crop_pct)
    data_config: dict
    num_classes: int
    topk: int  # stored top-k; 0 = dense (all logits in fp16)


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
        self.augment = _plain(self.augment)
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
        if self.classes and len(self.classes) != self.num_classes:
            problems.append(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if self.num_samples < 1 or self.views < 1:
            problems.append(
                f"need num_samples >= 1 and views >= 1, got {self.num_samples}, {self.views}"
            )
        if problems:
            raise ValueError("invalid manifest: " + "; ".join(problems))

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(
            f"model {name!r} is not in the store (it has {[m.name for m in self.models]})"
        )

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Manifest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class StoreLayout:
    """How samples map to shards (blocks) and inner chunks; stored under the manifest's ``layout``."""

    samples_per_shard: int
    chunk_samples: int  # inner chunk of the sharding codec, along the sample axis
    num_blocks: int

    @classmethod
    def for_store(cls, num_samples: int, views: int, samples_per_shard: int | None) -> StoreLayout:
        """Shards of ``samples_per_shard`` samples (default: ``default_samples_per_shard``), inner
        chunks of ``CHUNK_SAMPLES`` when that divides the shard, else one chunk per shard."""
        if samples_per_shard is None:
            samples_per_shard = min(default_samples_per_shard(views), _round_up_pow2(num_samples))
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        divides = samples_per_shard % CHUNK_SAMPLES == 0
        return cls(
            samples_per_shard=samples_per_shard,
            chunk_samples=CHUNK_SAMPLES if divides else samples_per_shard,
            num_blocks=-(-num_samples // samples_per_shard),
        )


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_samples_per_shard(views: int) -> int:
    """The largest power of two at most ``TARGET_VIEWS_PER_SHARD / views`` samples (at least 1)."""
    return 1 << max(0, int(math.log2(max(1, TARGET_VIEWS_PER_SHARD // max(1, views)))))


def _plain(value: Any) -> Any:
    """JSON-normal form (tuples become lists, numpy scalars Python numbers) for comparisons."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in the manifest: {value!r}")


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


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(stored: Any, wanted: Any, where: str = "") -> list[str]:
    """Human-readable paths where two JSON values differ: ``field: store has X, expected Y``."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        out = []
        for key in [*stored, *(k for k in wanted if k not in stored)]:
            out += _differences(
                stored.get(key), wanted.get(key), f"{where}.{key}" if where else key
            )
        return out
    if _same(stored, wanted):
        return []
    return [f"{where}: store has {_brief(stored)}, expected {_brief(wanted)}"]


def _model_differences(stored: list[dict], wanted: list[dict]) -> list[str]:
    """Pool differences keyed by model name (not list position)."""
    have, want = {m["name"]: m for m in stored}, {m["name"]: m for m in wanted}
    out = []
    if list(have) != list(want):
        out.append(f"models: store has {list(have)}, expected {list(want)}")
    for name in have.keys() & want.keys():
        out += _differences(have[name], want[name], f"models[{name}]")
    return out


def manifest_differences(stored: Manifest, wanted: Manifest) -> list[str]:
    """Every field where two manifests differ, except the fastkd version that wrote them."""
    a, b = stored.to_dict(), wanted.to_dict()
    for d in (a, b):
        d.pop("fastkd_version")
    return _model_differences(a.pop("models"), b.pop("models")) + _differences(a, b)


# ----------------------------------------------------------------------------------------------
# Encoding full logits


def id_dtype(num_classes: int) -> np.dtype:
    """Class-id dtype of sparse targets: uint16 up to 65536 classes, else uint32."""
    return np.dtype(np.uint16 if num_classes <= 65536 else np.uint32)


def resolve_topk(num_classes: int, topk: int) -> int:
    """The stored top-k for a model: 0 means dense (all logits in fp16).

    Dense when asked (``topk == 0``), when ``topk >= num_classes``, when ``num_classes <=
    DENSE_MAX_CLASSES`` (at most 256 B a view, exact, so 10 and 100 classes are dense), or when the
    dense row is at most ``DENSE_SLACK`` x the raw sparse row: ``2 C <= 1.25 K (2 + id bytes)``.
    """
    if num_classes < 1 or topk < 0:
        raise ValueError(f"need num_classes >= 1 and topk >= 0, got {num_classes}, {topk}")
    sparse_bytes = topk * (2 + id_dtype(num_classes).itemsize)
    dense = (
        topk == 0
        or topk >= num_classes
        or num_classes <= DENSE_MAX_CLASSES
        or 2 * num_classes <= DENSE_SLACK * sparse_bytes
    )
    return 0 if dense else topk


def encode_logits(
    logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, topk: int
) -> dict[str, np.ndarray]:
    """Full logits [n, V, C] of one model -> the stored arrays, as numpy on the CPU.

    ``lse`` [n, V] fp32 and ``true_logit`` [n, V] fp32 come from the fp32 logits; sparse
    (``topk > 0``): ``topk_logits`` [n, V, K] fp16 sorted descending and ``topk_ids`` [n, V, K];
    dense (``topk == 0``): ``logits`` [n, V, C] fp16. Runs on the logits' device.
    """
    import torch

    z = torch.as_tensor(logits)
    if z.dim() != 3:
        raise ValueError(f"logits must be [samples, views, classes], got {tuple(z.shape)}")
    n, _, num_classes = z.shape
    z = z.float()
    y = torch.as_tensor(labels, device=z.device).long()
    if y.shape != (n,):
        raise ValueError(
            f"labels must be [{n}] for logits of shape {tuple(z.shape)}, got {tuple(y.shape)}"
        )
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    out = {
        "lse": torch.logsumexp(z, dim=-1),
        "true_logit": z.gather(-1, y.view(n, 1, 1).expand(n, z.shape[1], 1)).squeeze(-1),
    }
    if topk == 0:
        out["logits"] = z.half()
    else:
        values, ids = torch.topk(z, topk, dim=-1, largest=True, sorted=True)
        out["topk_logits"] = values.half()
        out["topk_ids"] = ids.to(torch.int32)
    arrays = {k: v.cpu().numpy() for k, v in out.items()}
    if "topk_ids" in arrays:
        arrays["topk_ids"] = arrays["topk_ids"].astype(id_dtype(num_classes))
    return arrays


@dataclass
class ModelTargets:
    """Stored targets of one model for a batch of (sample, view) rows (numpy)."""

    lse: np.ndarray  # [b] fp32
    true_logit: np.ndarray  # [b] fp32
    topk_logits: np.ndarray | None = None  # [b, K] fp16, descending
    topk_ids: np.ndarray | None = None  # [b, K] uint16 / uint32
    logits: np.ndarray | None = None  # [b, C] fp16 (dense)

    @property
    def true_logprob(self) -> np.ndarray:
        """log p(y) at T = 1, exact whatever the top-k."""
        return self.true_logit - self.lse


# ----------------------------------------------------------------------------------------------
# Array creation (one place for shapes, chunks and codecs)


def _codecs(dtype: Any, views_innermost: bool) -> dict[str, Any]:
    """Codec chain of one array, spec codecs only (docs/store-format.md compares the options).

    Blosc-zstd with byte shuffle groups the bytes of like-typed values (the sign/exponent bytes of
    fp16/fp32, the high bytes of ids) before zstd. ``views_innermost`` first transposes a
    [sample, view, rank] chunk to [sample, rank, view], so the ids and logits of the views of one
    sample, which mostly agree, sit side by side. Strings: vlen-utf8 then zstd.
    """
    if dtype is str:
        return {"compressors": [ZstdCodec(level=ZSTD_LEVEL)]}
    codecs: dict[str, Any] = {
        "compressors": [
            BloscCodec(
                cname="zstd",
                clevel=ZSTD_LEVEL,
                shuffle="shuffle",
                typesize=np.dtype(dtype).itemsize,
            )
        ]
    }
    if views_innermost:
        codecs["filters"] = [TransposeCodec(order=(0, 2, 1))]
    return codecs


def _create_sharded(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: Any,
    layout: StoreLayout,
    fill_value: Any = 0,
    views_innermost: bool = False,
) -> zarr.Array:
    """An array sharded along the sample axis: one shard (file) per block."""
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        shards=(layout.samples_per_shard, *shape[1:]),
        chunks=(layout.chunk_samples, *shape[1:]),
        fill_value=fill_value,
        **_codecs(dtype, views_innermost),
    )


def _model_arrays(entry: ModelEntry, views: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (per-sample shape, dtype) of one model's arrays."""
    arrays = {
        "lse": ((views,), np.dtype(np.float32)),
        "true_logit": ((views,), np.dtype(np.float32)),
    }
    if entry.topk == 0:
        arrays["logits"] = ((views, entry.num_classes), np.dtype(np.float16))
    else:
        arrays["topk_logits"] = ((views, entry.topk), np.dtype(np.float16))
        arrays["topk_ids"] = ((views, entry.topk), id_dtype(entry.num_classes))
    return arrays


def _create_store(
    path: Path,
    manifest: Manifest,
    layout: StoreLayout,
    keys: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray,
) -> None:
    """Write a new store: shared arrays, empty model arrays, markers, then the manifest last."""
    n, v = manifest.num_samples, manifest.views
    group = zarr.open_group(path, mode="a", zarr_format=3)
    _create_sharded(group, "keys", (n,), str, layout, fill_value="")[:] = np.asarray(
        keys, dtype=object
    )
    _create_sharded(group, "labels", (n,), np.int64, layout)[:] = labels
    _create_sharded(group, "sizes", (n, 2), np.int32, layout)[:] = sizes
    boxes, flips = view_boxes(
        manifest.seed, np.arange(n), v, sizes, AugmentConfig.from_dict(manifest.augment)
    )
    # Integer pixel boxes: exact, and 3x smaller stored than float32 fractions (4.4 vs 13 B/view).
    box_dtype = np.uint16 if sizes.max() <= np.iinfo(np.uint16).max else np.uint32
    _create_sharded(group, "boxes", (n, v, 4), box_dtype, layout)[:] = boxes
    _create_sharded(group, "flips", (n, v), bool, layout, fill_value=False)[:] = flips
    _create_sharded(group, "skipped", (n,), bool, layout, fill_value=False)
    models = group.create_group("models")
    for entry in manifest.models:
        member = models.create_group(entry.name)
        for name, (shape, dtype) in _model_arrays(entry, v).items():
            ranked = len(shape) == 2  # [view, rank]: topk_logits, topk_ids, dense logits
            _create_sharded(member, name, (n, *shape), dtype, layout, views_innermost=ranked)
    group.create_array(
        _DONE_ARRAY,
        shape=(layout.num_blocks,),
        chunks=(1,),
        dtype=np.uint8,
        fill_value=0,
        compressors=None,
    )
    group.attrs[MANIFEST_ATTR] = {**manifest.to_dict(), "layout": asdict(layout)}


# ----------------------------------------------------------------------------------------------
# Writers' bookkeeping: who holds what (creation lock, shard claims)


@dataclass
class _Holder:
    """A writer process, as recorded in the creation lock and in shard claims."""

    host: str
    pid: int
    run_id: str
    shard: tuple[int, int]
    started: float
    heartbeat: float

    @classmethod
    def me(cls, run_id: str, shard: tuple[int, int]) -> _Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), run_id, shard, now, now)

    @classmethod
    def load(cls, path: Path) -> _Holder | None:
        """The holder in a lock or claim file; None when it vanished or is still being written."""
        try:
            values = json.loads(path.read_text())
            values["shard"] = tuple(values["shard"])
            return cls(**values)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def is_live(self) -> bool:
        """Dead when its heartbeat is stale, or when it ran on this host and its pid is gone."""
        if time.time() - self.heartbeat > CLAIM_STALE_S:
            return False
        return self.host != socket.gethostname() or _pid_alive(self.pid)

    def describe(self) -> str:
        i, n = self.shard
        age = time.time() - self.heartbeat
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, shard {i}/{n}, heartbeat {age:.0f} s ago)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json_atomic(path: Path, value: Any) -> None:
    write_json(path, value, default=_json_default, indent=None)


@contextlib.contextmanager
def _creation_lock(meta: Path, holder: _Holder) -> Iterator[None]:
    """Exclusive lock file while a store is created or checked; others wait, a dead holder's lock
    is broken."""
    lock = meta / "lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _Holder.load(lock)
            if other is not None and not other.is_live():
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                who = other.describe() if other else "a writer"
                raise StoreBusyError(
                    f"store {meta.parent} stayed locked by {who} for {LOCK_WAIT_S:.0f} s; "
                    f"if no fastkd process is creating it, delete {lock}"
                ) from None
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(holder), f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _shards_overlap(a: tuple[int, int], b: tuple[int, int], num_blocks: int) -> bool:
    """Whether shards ``i/n`` and ``j/m`` share a block (block b belongs to i/n when b % n == i)."""
    (i, n), (j, m) = a, b
    return any(block % m == j for block in range(i, num_blocks, n))


def resolve_shard(spec: str | None = None) -> tuple[int, int]:
    """``"i/n"``, else torchrun's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    if spec:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not match:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}")
        shard = int(match[1]), int(match[2])
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        shard = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        shard = (0, 1)
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
    return shard


# ----------------------------------------------------------------------------------------------
# Writer


def _read_config(path: Path) -> dict | None:
    """The manifest attribute of the zarr group at ``path``, or None when there is none."""
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    return group.attrs.get(MANIFEST_ATTR)


def _parse_config(path: Path, config: Mapping[str, Any]) -> tuple[Manifest, StoreLayout]:
    config = dict(config)
    if config.get("format_version") != FORMAT_VERSION:
        raise StoreMismatchError(
            path,
            [
                f"format_version: store has {config.get('format_version')!r}, expected {FORMAT_VERSION}"
            ],
            "this fastkd version cannot use it",
        )
    layout = StoreLayout(**config.pop("layout"))
    return Manifest.from_dict(config), layout


def open_manifest(path: Path | str) -> tuple[Manifest, StoreLayout]:
    """The manifest and layout of the store at ``path`` (any fastkd store, finished or not)."""
    path = Path(path)
    config = _read_config(path)
    if config is None:
        raise StoreError(
            f"{path} is not a fastkd store (no zarr group with a {MANIFEST_ATTR!r} manifest)"
        )
    return _parse_config(path, config)


def _clear_store(path: Path) -> None:
    """Delete a store's data, keeping its lock and claims."""
    for entry in path.iterdir():
        if entry.name == _META_DIR:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class StoreWriter:
    """Writes blocks of a store; one per process, holding a claim on its shard ``i/n``.

    Use ``create_or_resume`` and close it (or use it as a context manager) to release the claim.
    """

    def __init__(self, path: Path, shard: tuple[int, int], run_id: str) -> None:
        self.path = path
        self.shard = shard
        self.run_id = run_id
        self.manifest, self.layout = open_manifest(path)
        self._group = zarr.open_group(path, mode="r+", zarr_format=3)
        self._labels = self._group["labels"][:]
        self._done = self._group[_DONE_ARRAY]
        self._claim = path / _META_DIR / "claims" / f"{run_id}.json"
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="fastkd-claim", daemon=True)
        self._lost_claim = False

    @classmethod
    def create_or_resume(
        cls,
        path: Path | str,
        manifest: Manifest,
        keys: Sequence[str],
        labels: np.ndarray,
        sizes: np.ndarray,
        *,
        overwrite: bool = False,
        samples_per_shard: int | None = None,
        shard: tuple[int, int] = (0, 1),
        force_claim: bool = False,
    ) -> StoreWriter:
        """Create the store, or reopen it when its manifest equals ``manifest`` (resume).

        A store with another configuration is refused (``StoreMismatchError``, naming what
        differs) unless ``overwrite``; a path holding anything that is not a fastkd store is never
        touched. Ranks may call this at once: one creates under a lock, the others wait and
        validate. The writer then claims ``shard``; a live writer whose shard overlaps is refused
        (``StoreBusyError``) unless ``force_claim``.
        """
        path = Path(path)
        labels, sizes = _check_samples(manifest, keys, labels, sizes)
        layout = StoreLayout.for_store(manifest.num_samples, manifest.views, samples_per_shard)
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: need 0 <= i < n")
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a store directory")
        if path.is_dir() and any(path.iterdir()) and not (path / _META_DIR).is_dir():
            raise StoreError(f"{path} exists and is not a fastkd store; choose another output path")
        meta = path / _META_DIR
        (meta / "claims").mkdir(parents=True, exist_ok=True)

        run_id = uuid.uuid4().hex[:12]
        me = _Holder.me(run_id, (i, n))
        with _creation_lock(meta, me):
            layout = _create_or_check(
                path,
                manifest,
                keys,
                labels,
                sizes,
                layout,
                samples_per_shard is not None,
                overwrite,
            )
            _claim_shard(meta, me, layout.num_blocks, force_claim)
        writer = cls(path, (i, n), run_id)
        writer._heartbeat.start()
        return writer

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def block_range(self, block: int) -> tuple[int, int]:
        """Samples ``[start, stop)`` of a block."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside [0, {self.num_blocks})")
        start = block * self.layout.samples_per_shard
        return start, min(start + self.layout.samples_per_shard, self.manifest.num_samples)

    def pending_blocks(self, shard: tuple[int, int] | None = None) -> list[int]:
        """Blocks of ``shard`` (default: this writer's) without a completion marker."""
        i, n = shard or self.shard
        done = self._done[:]
        return [b for b in range(i, self.num_blocks, n) if not done[b]]

    def write_block(
        self,
        block: int,
        logits: Mapping[str, np.ndarray | torch.Tensor],
        skipped: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        """Encode and write one block, then mark it done.

        logits: every model's full logits [n, V, C] for the block's samples (``block_range``), in
        sample order. skipped: offsets within the block of samples whose image could not be read
        (their rows are written as given, e.g. zeros, and flagged in ``skipped``).
        """
        if self._lost_claim or not self._claim.exists():
            raise StoreBusyError(
                f"the claim {self._claim} of this writer was removed (forced by another dump?); "
                "stopping so two writers never write one block"
            )
        i, n = self.shard
        if block % n != i:
            raise ValueError(
                f"block {block} belongs to shard {block % n}/{n}, this writer holds {i}/{n}"
            )
        start, stop = self.block_range(block)
        expected = [m.name for m in self.manifest.models]
        if sorted(logits) != sorted(expected):
            raise ValueError(
                f"block {block}: logits for models {sorted(logits)}, the store has {sorted(expected)}"
            )
        for entry in self.manifest.models:
            shape = tuple(logits[entry.name].shape)
            want = (stop - start, self.manifest.views, entry.num_classes)
            if shape != want:
                raise ValueError(
                    f"block {block}, model {entry.name!r}: logits of shape {shape}, expected {want}"
                )
        flags = np.zeros(stop - start, dtype=bool)
        if skipped is not None:
            offsets = np.asarray(skipped, dtype=np.int64).reshape(-1)
            if offsets.size and (offsets.min() < 0 or offsets.max() >= stop - start):
                raise ValueError(
                    f"block {block}: skipped offsets must be in [0, {stop - start}) (offsets "
                    f"within the block, not sample indices), got {offsets.tolist()}"
                )
            flags[offsets] = True

        models = self._group["models"]
        for entry in self.manifest.models:
            try:
                encoded = encode_logits(logits[entry.name], self._labels[start:stop], entry.topk)
            except ValueError as err:
                raise ValueError(
                    f"block {block} (samples {start}-{stop - 1}), model {entry.name!r}: {err}"
                ) from None
            member = models[entry.name]
            for name, values in encoded.items():
                member[name][start:stop] = values
        self._group["skipped"][start:stop] = flags
        self._done[block] = 1

    # -- claims --------------------------------------------------------------------------------

    def _beat(self) -> None:
        holder = _Holder.load(self._claim)
        while not self._stop.wait(HEARTBEAT_S):
            if not self._claim.exists():
                self._lost_claim = True
                return
            if holder is not None:
                holder.heartbeat = time.time()
                _write_json_atomic(self._claim, asdict(holder))

    def close(self) -> None:
        """Release the claim; if every block is done, record the store as complete."""
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join()
        self._claim.unlink(missing_ok=True)
        done = self._done[:]
        if done.all() and STATUS_ATTR not in self._group.attrs:
            skipped = np.flatnonzero(self._group["skipped"][:])
            keys = self._group["keys"]
            self._group.attrs[STATUS_ATTR] = {
                "complete": True,
                "skipped": [str(keys[int(s)]) for s in skipped],
            }

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_or_check(
    path: Path,
    manifest: Manifest,
    keys: Sequence[str],
    labels: np.ndarray,
    sizes: np.ndarray,
    layout: StoreLayout,
    explicit_layout: bool,
    overwrite: bool,
) -> StoreLayout:
    """Under the creation lock: create the store, or check that the existing one matches.

    Returns the layout in force (an existing store keeps its own unless one was asked for).
    """
    meta = path / _META_DIR
    stored = _read_config(path)
    if stored is None:
        torn = (meta / _CREATING).exists()  # a creation that crashed before its manifest
        if not torn and any(p.name != _META_DIR for p in path.iterdir()):
            raise StoreError(
                f"{path} holds a zarr group that is not a fastkd store; choose another output path"
            )
    else:
        try:
            stored_manifest, stored_layout = _parse_config(path, stored)
        except StoreMismatchError as err:  # another format version: only overwrite helps
            problems = err.differences
        else:
            problems = manifest_differences(stored_manifest, manifest)
            if explicit_layout and stored_layout != layout:
                problems += _differences(asdict(stored_layout), asdict(layout), "layout")
            if not problems:
                problems = _sample_differences(path, labels)
            if not problems:
                return stored_layout
        if not overwrite:
            raise StoreMismatchError(
                path,
                problems,
                "refusing to resume into it; pass overwrite=True (--overwrite) to replace it, "
                "or write to another path",
            )
        live = [h for h in _claims(meta) if h.is_live()]
        if live:
            raise StoreBusyError(
                f"cannot overwrite {path}: live writers hold it: "
                + "; ".join(h.describe() for h in live)
            )
    (meta / _CREATING).touch()
    _clear_store(path)
    _create_store(path, manifest, layout, keys, labels, sizes)
    (meta / _CREATING).unlink()
    return layout


def _check_samples(
    manifest: Manifest, keys: Sequence[str], labels: np.ndarray, sizes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n = manifest.num_samples
    labels = np.asarray(labels)
    sizes = np.asarray(sizes)
    if len(keys) != n or labels.shape != (n,) or sizes.shape != (n, 2):
        raise ValueError(
            f"the manifest has {n} samples but got {len(keys)} keys, labels of shape "
            f"{labels.shape} and sizes of shape {sizes.shape} (need [{n}] and [{n}, 2])"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if bad.size:
        s = int(bad[0])
        raise ValueError(
            f"sample {s} ({keys[s]}) has label {labels[s]}, outside the {manifest.num_classes} "
            f"classes of the pool ({bad.size} such samples)"
        )
    if (sizes < 1).any():
        s = int(np.flatnonzero((sizes < 1).any(axis=1))[0])
        raise ValueError(f"sample {s} ({keys[s]}) has an empty image size {tuple(sizes[s])}")
    return labels.astype(np.int64), sizes.astype(np.int32)


def _sample_differences(path: Path, labels: np.ndarray) -> list[str]:
    """Labels that differ from the store's (the fingerprint already covers keys and files)."""
    stored = zarr.open_group(path, mode="r", zarr_format=3)["labels"][:]
    diff = np.flatnonzero(stored != labels)
    if not diff.size:
        return []
    s = int(diff[0])
    return [
        f"labels: {diff.size} differ, first sample {s}: store has {stored[s]}, expected {labels[s]}"
    ]


def _claims(meta: Path) -> list[_Holder]:
    holders = []
    for file in sorted((meta / "claims").glob("*.json")):
        holder = _Holder.load(file)
        if holder is not None:
            holders.append(holder)
    return holders


def _claim_shard(meta: Path, me: _Holder, num_blocks: int, force: bool) -> None:
    """Record this writer's claim; refuse when a live writer holds an overlapping shard."""
    claims = meta / "claims"
    for holder in _claims(meta):
        file = claims / f"{holder.run_id}.json"
        if not holder.is_live():
            file.unlink(missing_ok=True)
        elif _shards_overlap(holder.shard, me.shard, num_blocks):
            if not force:
                i, n = me.shard
                raise StoreBusyError(
                    f"store {meta.parent}: shard {i}/{n} overlaps the live claim of "
                    f"{holder.describe()}. Two uncoordinated dumps into one store are refused: give "
                    f"each rank its own --shard i/n. If that dump is dead, wait {CLAIM_STALE_S:.0f} s "
                    f"after its last heartbeat, delete {file}, or force it (force_claim=True)."
                )
            file.unlink(missing_ok=True)
    _write_json_atomic(claims / f"{me.run_id}.json", asdict(me))


# ----------------------------------------------------------------------------------------------
# Reader


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
                out += _differences(_plain(getattr(manifest, name)), _plain(want), name)
        names = [m.name for m in manifest.models]
        missing = [m for m in self.models or () if m not in names]
        if missing:
            out.append(f"models: store has {names}, expected it to contain {missing}")
        for name, config in (self.data_configs or {}).items():
            if name not in names:
                out.append(f"data_config of {name!r}: the store has no model {name!r} ({names})")
                continue
            stored = _plain(manifest.model(name).data_config)
            want = _plain(config)
            for key in want:
                out += _differences(stored.get(key), want[key], f"models[{name}].data_config.{key}")
        for name, sha in (self.checkpoints or {}).items():
            if name not in names:
                out.append(f"checkpoint of {name!r}: the store has no model {name!r} ({names})")
            elif manifest.model(name).checkpoint_sha256 != sha:
                stored = manifest.model(name).checkpoint_sha256
                out.append(
                    f"models[{name}].checkpoint_sha256: store has {stored!r}, expected {sha!r}"
                )
        return out


class _BlockCache:
    """Decoded blocks of a few arrays in a fixed arena of slots, evicted least recently used.

    ``gather`` is vectorised: rows map to (slot, offset in block, view) by array lookups, so a
    batch costs a handful of numpy calls once its blocks are resident, whatever its size.
    """

    def __init__(
        self, arrays: Mapping[str, zarr.Array], samples_per_block: int, max_bytes: int
    ) -> None:
        self._arrays = dict(arrays)
        self._block = samples_per_block
        first = next(iter(self._arrays.values()))
        self._num_samples = first.shape[0]
        num_blocks = -(-self._num_samples // samples_per_block)
        block_bytes = sum(
            samples_per_block * math.prod(a.shape[1:]) * a.dtype.itemsize
            for a in self._arrays.values()
        )
        self.slots = max(1, min(num_blocks, max_bytes // max(1, block_bytes)))
        self._arena = {
            name: np.empty((self.slots, samples_per_block, *a.shape[1:]), dtype=a.dtype)
            for name, a in self._arrays.items()
        }
        self._slot_of = np.full(num_blocks, -1, dtype=np.int64)
        self._block_in = np.full(self.slots, -1, dtype=np.int64)
        self._last_used = np.zeros(self.slots, dtype=np.int64)
        self._clock = 0
        self.loads = 0

    def _load(self, blocks: np.ndarray, keep: np.ndarray) -> None:
        """Decode ``blocks`` into the least recently used slots, never evicting ``keep``'s."""
        used = self._last_used.copy()
        used[self._slot_of[keep][self._slot_of[keep] >= 0]] = np.iinfo(np.int64).max
        victims = np.argsort(used, kind="stable")[: blocks.size]
        for block, slot in zip(blocks.tolist(), victims.tolist(), strict=True):
            old = self._block_in[slot]
            if old >= 0:
                self._slot_of[old] = -1
            start = block * self._block
            stop = min(start + self._block, self._num_samples)
            for name, array in self._arrays.items():
                self._arena[name][slot, : stop - start] = array[start:stop]
            self._slot_of[block] = slot
            self._block_in[slot] = block
            self.loads += 1

    def gather(self, samples: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``(samples[i], views[i])`` of every array."""
        blocks = samples // self._block
        needed = np.unique(blocks)
        if needed.size > self.slots:  # more blocks than fit: split the batch by blocks
            out = {
                name: np.empty((samples.size, *a.shape[3:]), dtype=a.dtype)
                for name, a in self._arena.items()
            }
            for group in np.array_split(needed, -(-needed.size // self.slots)):
                mask = np.isin(blocks, group)
                for name, rows in self.gather(samples[mask], views[mask]).items():
                    out[name][mask] = rows
            return out
        missing = needed[self._slot_of[needed] < 0]
        if missing.size:
            self._load(missing, needed)
        self._clock += 1
        slot = self._slot_of[blocks]
        self._last_used[slot] = self._clock
        offset = samples - blocks * self._block
        return {name: a[slot, offset, views] for name, a in self._arena.items()}


class StoreReader:
    """Random access to a finished store, validated against what training expects.

    ``read`` and ``read_pool`` take any batch of (sample, view) rows; shards are decoded whole
    through zarr into a block cache (``cache_bytes`` in all) and indexed with numpy.
    """

    def __init__(
        self,
        path: Path | str,
        expect: Expectation | None = None,
        *,
        allow_incomplete: bool = False,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.path = Path(path)
        self.manifest, self.layout = open_manifest(self.path)
        if expect is not None:
            problems = expect.differences(self.manifest)
            if problems:
                raise StoreMismatchError(
                    self.path, problems, "refusing targets made for other data or models"
                )
        self._group = zarr.open_group(self.path, mode="r", zarr_format=3)
        self._done = self._group[_DONE_ARRAY][:].astype(bool)
        if not self._done.all() and not allow_incomplete:
            pending = np.flatnonzero(~self._done)
            raise StoreError(
                f"store {self.path} is incomplete: {pending.size} of {self.layout.num_blocks} blocks "
                f"not written (first {pending[:5].tolist()}); finish the dump (it resumes) or pass "
                "allow_incomplete=True"
            )
        self.labels: np.ndarray = self._group["labels"][:]
        self.sizes: np.ndarray = self._group["sizes"][:]
        self.skipped: np.ndarray = self._group["skipped"][:]
        self._keys: list[str] | None = None
        self._cache_bytes = cache_bytes
        self._caches: dict[str | None, _BlockCache] = {}

    # -- manifest shortcuts --------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_views(self) -> int:
        return self.manifest.views

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models]

    @property
    def keys(self) -> list[str]:
        """Sample keys (paths relative to the data root), loaded on first use."""
        if self._keys is None:
            self._keys = [str(k) for k in self._group["keys"][:]]
        return self._keys

    def pending_blocks(self) -> list[int]:
        return np.flatnonzero(~self._done).tolist()

    @property
    def blocks_decoded(self) -> int:
        """Shards decoded so far by the block caches (each decoded once while it stays cached)."""
        return sum(cache.loads for cache in self._caches.values())

    # -- random access -------------------------------------------------------------------------

    def _cache(self, model: str | None) -> _BlockCache:
        """The block cache of one model's arrays (None: the view parameters), made on first use;
        zarr lookups cost milliseconds, so they happen only here."""
        cache = self._caches.get(model)
        if cache is None:
            if model is None:
                arrays = {name: self._group[name] for name in ("boxes", "flips")}
            else:
                entry = self.manifest.model(model)
                member = self._group[f"models/{model}"]
                arrays = {name: member[name] for name in _model_arrays(entry, self.num_views)}
            share = self._cache_bytes // (len(self.manifest.models) + 1)
            cache = _BlockCache(arrays, self.layout.samples_per_shard, share)
            self._caches[model] = cache
        return cache

    def _rows(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        views = np.asarray(views, dtype=np.int64).reshape(-1)
        if views.size == 1 and samples.size != 1:
            views = np.broadcast_to(views, samples.shape)
        if samples.shape != views.shape:
            raise ValueError(
                f"samples {samples.shape} and views {views.shape} must have one entry per row"
            )
        if samples.size and not (samples.min() >= 0 and samples.max() < self.num_samples):
            bad = samples[(samples < 0) | (samples >= self.num_samples)][0]
            raise IndexError(f"sample {bad} is outside the store's {self.num_samples} samples")
        if views.size and not (views.min() >= 0 and views.max() < self.num_views):
            bad = views[(views < 0) | (views >= self.num_views)][0]
            raise IndexError(f"view {bad} is outside the store's {self.num_views} views")
        blocks = samples // self.layout.samples_per_shard
        if not self._done[blocks].all():
            s = samples[~self._done[blocks]][0]
            raise StoreError(
                f"sample {s} of {self.path} is in block {s // self.layout.samples_per_shard}, not written yet"
            )
        return samples, views

    def view_params(self, samples: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Crop boxes [b, 4] (y0, x0, h, w fractions, as ``views.view_params``) and flips [b] of
        the given rows, from the stored pixel boxes."""
        samples, views = self._rows(samples, views)
        rows = self._cache(None).gather(samples, views)
        return box_fractions(rows["boxes"], self.sizes[samples]), rows["flips"]

    def read(self, model: str, samples: np.ndarray, views: np.ndarray) -> ModelTargets:
        """Stored targets of one model for rows (samples[i], views[i])."""
        cache = self._cache(model)
        return ModelTargets(**cache.gather(*self._rows(samples, views)))

    def read_pool(
        self,
        models: Sequence[str] | None,
        samples: np.ndarray,
        views: np.ndarray,
        device: torch.device | str | None = None,
    ) -> PoolTargets:
        """Targets of several models (default: all, in manifest order) stacked as ``PoolTargets``:
        lse/true_logit [B, M] fp32, topk_logits [B, M, K] fp16 and topk_ids [B, M, K] int64, or
        logits [B, M, C] fp16."""
        import torch

        from fastkd.kernels.targets import PoolTargets

        names = list(models) if models is not None else self.model_names
        entries = [self.manifest.model(n) for n in names]
        if len({e.topk for e in entries}) != 1:
            raise ValueError(
                "read_pool needs one storage mode for all models, got topk "
                + ", ".join(f"{e.name}={e.topk}" for e in entries)
            )
        parts = [self.read(n, samples, views) for n in names]

        def stack(field_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
            tensor = torch.from_numpy(np.stack([getattr(p, field_name) for p in parts], axis=1))
            return tensor.to(device=device, dtype=dtype)

        if entries[0].topk == 0:
            return PoolTargets(
                lse=stack("lse"), true_logit=stack("true_logit"), logits=stack("logits")
            )
        return PoolTargets(
            lse=stack("lse"),
            true_logit=stack("true_logit"),
            topk_logits=stack("topk_logits"),
            topk_ids=stack("topk_ids", torch.int64),
        )


# ----------------------------------------------------------------------------------------------
# Summary (fastkd inspect)


@dataclass
class ArraySummary:
    path: str  # inside the store, e.g. models/resnet18/topk_logits
    shape: tuple[int, ...]
    dtype: str
    nbytes: int  # decoded
    nbytes_stored: int  # on disk, compressed, sharding index included


@dataclass
class StoreSummary:
    manifest: Manifest
    layout: StoreLayout
    blocks_done: int
    arrays: list[ArraySummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    num_files: int = 0

    def bytes_per_view(self, model: str | None = None) -> float:
        """Stored bytes per (sample, view) of one model's arrays (None: the shared arrays)."""
        prefix = f"models/{model}/" if model else None
        total = sum(
            a.nbytes_stored
            for a in self.arrays
            if (a.path.startswith(prefix) if prefix else not a.path.startswith("models/"))
        )
        return total / (self.manifest.num_samples * self.manifest.views)

    @property
    def compression_ratio(self) -> float:
        stored = sum(a.nbytes_stored for a in self.arrays)
        return sum(a.nbytes for a in self.arrays) / max(1, stored)


def summarize(path: Path | str) -> StoreSummary:
    """Manifest, array sizes and stored bytes of a store (finished or not)."""
    path = Path(path)
    manifest, layout = open_manifest(path)
    group = zarr.open_group(path, mode="r", zarr_format=3)
    names = [*SHARED_ARRAYS] + [
        f"models/{m.name}/{a}" for m in manifest.models for a in _model_arrays(m, manifest.views)
    ]
    arrays = []
    keys = group["keys"][:]
    for name in names:
        array = group[name]
        if name == "keys":  # variable length: the UTF-8 bytes of all keys
            nbytes = sum(len(str(k).encode()) for k in keys)
        else:
            nbytes = math.prod(array.shape) * array.dtype.itemsize
        arrays.append(
            ArraySummary(name, tuple(array.shape), str(array.dtype), nbytes, array.nbytes_stored())
        )
    skipped_mask = group["skipped"][:]
    return StoreSummary(
        manifest=manifest,
        layout=layout,
        blocks_done=int(group[_DONE_ARRAY][:].sum()),
        arrays=arrays,
        skipped=[str(keys[int(s)]) for s in np.flatnonzero(skipped_mask)],
        num_files=sum(1 for p in path.rglob("*") if p.is_file() and _META_DIR not in p.parts),
    )
