"""WebDataset tar shards as a data set: each shard's members indexed once, read by offset
(``fastkd.data.shard_members``).

A shard spec is a ``.tar`` path or a brace pattern (``shards/train-{000000..000127}.tar``,
expanded by ``braceexpand`` as WebDataset does). A sample is a WebDataset key: a member's path
up to the first dot of its base name (``a/n01440764_10026.jpg`` -> ``a/n01440764_10026``), with
exactly one image member (``jpg``, ``png``, ... as ``IMAGE_EXTENSIONS``) and a ``cls`` member
holding its class index as text. Other members (``json``, ``txt``, ...) are left alone.

Why an index rather than a stream (WebDataset's, or DALI's ``fn.readers.webdataset``): fastkd
replays a planned order. A store plans (sample, view) rows and their crops, training visits the
samples in a seeded shuffled order, and both loaders take the items in that order and in our
batch boundaries (``fastkd.data.dali``). A tar reader yields a shard's members in the order they
lie (or in its own shuffle), so it cannot serve that order. Instead the shards' headers are read
once on open (``tarfile``; for an uncompressed tar that is one small read per member; in
processes when the shards are large, as parsing is CPU-bound), which gives each image's (shard,
offset, size), and both backends read a member's bytes with one ``os.pread`` from a fresh
descriptor (fork-safe: a DataLoader worker shares nothing), then decode them exactly as a
file's. The dump visits the samples in order, so its reads stream through each shard.
Compressed shards (``.tar.gz``, ``.tgz``, ...) have no offsets to read at: refused.

Shards on object storage (``s3://bucket/train-{000000..000146}.tar``) are indexed and read the
same way by byte range: the walk reads a shard through a window of a few MiB
(``fastkd.storage.ranges.ObjectReader``), members are read a batch at a time
(``ShardMembers.read_many``), and every request is conditioned on the ETag the shard had when
indexed, so a rewritten shard is refused, never read at its old offsets.

The index is what a folder's listing is: keys, labels and image sizes (the fingerprint's), so a
store made from shards refuses other shards and resumes on the same ones.

Each command and torchrun rank opens the data again (ImageNet's scan: two CPU minutes), so each
shard's scan is cached on disk (``fastkd.data.shard_cache``).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from braceexpand import braceexpand

from fastkd.data.decoding import IMAGE_EXTENSIONS
from fastkd.data.labels import MAX_CLASSES, parse_label
from fastkd.data.shard_cache import (
    ObjectIdentity,
    ShardIdentity,
    ShardScan,
    cache_dir,
    read_cached,
    write_cached,
)
from fastkd.data.shard_members import ShardMembers
from fastkd.errors import DatasetError, ObjectChangedError, ShardChangedError
from fastkd.storage import ObjectLocation, as_location
from fastkd.storage.clients import fresh_process_context
from fastkd.storage.options import SCHEMES, is_object_url
from fastkd.storage.ranges import ObjectReader

Shard = Path | ObjectLocation  # a local (or mounted) shard, or one on object storage

SHARD_SUFFIX = ".tar"
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_IMAGE_FIELDS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_LABEL_FIELD = "cls"
_MAX_LABEL_BYTES = 4096  # a class index as text, with any whitespace around it
_STREAM = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")  # WebDataset's URL and pipe specs
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's (key, field) of a member name
_IO_THREADS = 16  # small shard sets: scans wait on the disk, more threads than cores
_MAX_PROCESSES = 16  # large ones: header parsing is CPU-bound (``_scan_all``)
_PROCESS_BYTES = 1 << 30  # shard bytes from which the scan is worth starting processes

log = logging.getLogger(__name__)


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether a data spec names tar shards: a ``.tar`` (or compressed tar) path that is not a
    folder, or a brace pattern that expands (a path that exists as written is a folder or a
    file list)."""
    text = os.fspath(spec)
    if os.path.isdir(text):
        return False
    if text.lower().endswith((SHARD_SUFFIX, *COMPRESSED_SUFFIXES)):
        return True
    return "{" in text and not os.path.exists(text) and list(braceexpand(text)) != [text]


def expand_shards(spec: str | os.PathLike) -> list[Shard]:
    """The shards of a spec, in order, each an uncompressed ``.tar``: local paths that exist,
    or objects (whether each exists is asked when it is indexed: ``_identities``)."""
    text = os.fspath(spec)
    remote = is_object_url(text)
    if _STREAM.match(text) and not remote:
        raise DatasetError(
            f"data spec {text!r} is a stream: fastkd reads shard members by offset, from local "
            f"(or mounted) .tar files or from {', '.join(s + '://' for s in SCHEMES)} objects; "
            "copy or mount the shards and give their paths"
        )
    names = list(braceexpand(text))
    compressed = [n for n in names if n.lower().endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise DatasetError(
            f"shard {compressed[0]} is a compressed tar: its members cannot be read by offset, "
            "so fastkd cannot replay its planned order from it; decompress the shards to .tar "
            "(e.g. gunzip, or zcat x.tar.gz > x.tar)"
        )
    other = [n for n in names if not n.lower().endswith(SHARD_SUFFIX)]
    if other:
        raise DatasetError(
            f"data spec {text!r} expands to {other[0]!r}, not a .tar shard: a shard pattern names "
            "tar files (e.g. 'shards/train-{000000..000127}.tar')"
        )
    repeated = [n for n, count in Counter(names).items() if count > 1]
    if repeated:
        raise DatasetError(f"data spec {text!r} names shard {repeated[0]} more than once")
    if remote:
        return [as_location(name) for name in names]
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        raise DatasetError(
            f"shard {missing[0]} does not exist ({len(missing)} of the {len(names)} shards of "
            f"{text!r} are missing)"
        )
    return [Path(n) for n in names]


class _Member(NamedTuple):
    """What the index keeps of a tar member (not its ``TarInfo``: millions of them add up)."""

    name: str
    offset: int  # its first data byte in the shard
    size: int


@dataclass
class _Sample:
    image: _Member | None = None
    label: _Member | None = None


def index_shards(shards: Sequence[Shard]) -> tuple[list[str], np.ndarray, ShardMembers]:
    """(keys, labels int64 [n], members) of the shards' samples, shard by shard, each shard's
    in member order; a key in two shards, or one without exactly one image and one integer
    ``cls``, is refused naming its shard."""
    scans, identities = _scan_all(shards)
    keys = [key for scan in scans for key in scan.keys]
    where = np.repeat(np.arange(len(shards), dtype=np.int32), [len(scan.keys) for scan in scans])
    if len(set(keys)) != len(keys):  # a shard's keys are unique (its scan's): two shards share one
        first: dict[str, int] = {}
        for key, index in zip(keys, where.tolist(), strict=True):
            if first.setdefault(key, index) != index:
                raise DatasetError(
                    f"key {key!r} is in shard {shards[first[key]]} and in shard {shards[index]}: "
                    "a sample's key must be unique across the shards (it identifies the sample "
                    "in the store)"
                )
    if not keys:
        raise DatasetError(
            f"the {len(shards)} shard(s) from {shards[0]} hold no samples (an image member and "
            f"a .{_LABEL_FIELD} member per key; image extensions: {', '.join(sorted(_IMAGE_FIELDS))})"
        )
    members = ShardMembers(
        shards=tuple(shards),
        shard=where,
        offset=np.concatenate([scan.offsets for scan in scans]),
        size=np.concatenate([scan.sizes for scan in scans]),
        member=tuple(name for scan in scans for name in scan.names),
        versions=tuple(getattr(identity, "etag", None) for identity in identities),
    )
    return keys, np.concatenate([scan.labels for scan in scans]), members


def _scan_all(
    shards: Sequence[Shard],
) -> tuple[list[ShardScan], list[ObjectIdentity | None]]:
    """Every shard's scan, in order, and the identity of each remote one (None: local): from
    the cache, else parsed (and cached). ``tarfile`` parses a header in Python (about 30-60 us
    a member: a minute for ImageNet's 2.6 million members on one core), so large data sets are
    scanned in processes, one shard each; small ones in threads (no process start-up)."""
    cache = cache_dir()
    identities = _identities(shards)
    scans = [
        _bounded(read_cached(cache, shard if identity is None else identity))
        for shard, identity in zip(shards, identities, strict=True)
    ]
    todo = [
        (shard, identity)
        for shard, identity, scan in zip(shards, identities, scans, strict=True)
        if scan is None
    ]
    if not todo:
        return scans, identities
    work = functools.partial(_scan_and_cache, cache=cache)
    processes = min(len(todo), _scan_cores(), _MAX_PROCESSES)
    size = sum(os.path.getsize(s) if i is None else i.size for s, i in todo)
    if processes > 1 and size >= _PROCESS_BYTES:
        remote = any(identity is not None for _, identity in todo)  # obstore is not fork-safe
        context = fresh_process_context() if remote else multiprocessing.get_context()
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            done = list(pool.map(work, *zip(*todo, strict=True)))
    else:
        with ThreadPoolExecutor(min(_IO_THREADS, len(todo))) as pool:
            done = list(pool.map(work, *zip(*todo, strict=True)))
    fresh = iter(scan for scan, _ in done)
    unwritten = [why for _, why in done if why is not None]
    if unwritten:
        log.debug("%d shard index(es) not cached in %s: %s", len(unwritten), cache, unwritten[0])
    return [next(fresh) if scan is None else scan for scan in scans], identities


def _identities(shards: Sequence[Shard]) -> list[ObjectIdentity | None]:
    """Each remote shard's URL, size and ETag (one HEAD each, in threads), None for a local
    one; a missing object is refused as a missing file is (``expand_shards``)."""
    remote = [shard for shard in shards if isinstance(shard, ObjectLocation)]
    if not remote:
        return [None] * len(shards)

    def head(shard: ObjectLocation) -> ObjectIdentity | None:
        try:
            return ObjectIdentity.of(shard)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(min(_IO_THREADS, len(remote))) as pool:
        found = dict(zip(remote, pool.map(head, remote), strict=True))
    missing = [shard for shard, identity in found.items() if identity is None]
    if missing:
        raise DatasetError(
            f"shard {missing[0]} does not exist ({len(missing)} of the {len(shards)} shards "
            "are missing)"
        )
    return [found.get(shard) if isinstance(shard, ObjectLocation) else None for shard in shards]


def _bounded(scan: ShardScan | None) -> ShardScan | None:
    """A cached scan, unless a label of it is not below ``MAX_CLASSES`` (cached before the
    bound): that shard is scanned again, so the refusal names its member."""
    if scan is None or not len(scan.labels) or scan.labels.max() < MAX_CLASSES:
        return scan
    return None


def _scan_cores() -> int:
    """The cores the scan may use: this process's (its affinity), shared with the node's other
    torchrun ranks (``LOCAL_WORLD_SIZE``), which open the data at the same time."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return max(1, (cores or 1) // max(1, int(ranks) if ranks.isdigit() else 1))


def _scan_and_cache(
    shard: Shard, remote: ObjectIdentity | None, cache: Path | None
) -> tuple[ShardScan, str | None]:
    """The shard's scan, and why it was not cached where the cache failed (the caller logs it
    once). Only a clean scan of a shard that did not change while it was read is cached (a
    remote one's reads are all of the ETag ``remote`` names)."""
    if remote is not None:
        scan = _scan_shard(shard, remote)
        return scan, None if cache is None else write_cached(cache, remote, scan)
    identity = ShardIdentity.of(shard)
    scan = _scan_shard(shard)
    if cache is None or ShardIdentity.of(shard) != identity:
        return scan, None
    return scan, write_cached(cache, identity, scan)


def _scan_shard(shard: Shard, remote: ObjectIdentity | None = None) -> ShardScan:
    """One shard's samples (key, image member, class index), in the order of the images; a
    remote one's (``remote``: its identity) read in windows of that ETag only."""
    if remote is None:
        return _scan_file(shard, open(shard, "rb"))  # closed by _scan_file
    try:
        return _scan_file(shard, ObjectReader(shard, remote.size, remote.etag))
    except ObjectChangedError:
        raise ShardChangedError(
            f"shard {shard} changed while it was being indexed; open the data again"
        ) from None


def _scan_file(shard: Shard, opened: BinaryIO | ObjectReader) -> ShardScan:
    """``_scan_shard`` of a shard opened (and closed here)."""
    with opened as file:
        head = file.read(6)
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
        if kind is not None:
            raise DatasetError(
                f"shard {shard} is {kind}-compressed: its members cannot be read by offset; "
                "store the shards as plain .tar"
            )
        end = file.size if isinstance(file, ObjectReader) else os.fstat(file.fileno()).st_size
        file.seek(0)
        samples: dict[str, _Sample] = {}
        dotted: dict[str, str] = {}
        texts: dict[int, bytes] = {}  # label member offset -> its bytes, read on the walk
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:  # type: ignore[call-overload]
                for info in tar:
                    _add_member(shard, info, samples, dotted, end, texts, file)
                archive_end = tar.offset
        except tarfile.TarError as error:
            raise DatasetError(
                f"shard {shard} is truncated or damaged: it cannot be read as a tar ({error})"
            ) from None
        _check_end_marker(shard, file, archive_end, end)
        complete = _complete(shard, samples, dotted)
        images = [sample.image for sample in complete.values()]
        return ShardScan(
            keys=list(complete),
            names=[image.name for image in images],
            offsets=np.asarray([image.offset for image in images], dtype=np.int64),
            sizes=np.asarray([image.size for image in images], dtype=np.int64),
            labels=np.asarray([_label(shard, s, texts) for s in complete.values()], dtype=np.int64),
        )


def _add_member(
    shard: Shard,
    info: tarfile.TarInfo,
    samples: dict[str, _Sample],
    dotted: dict[str, str],
    end: int,
    texts: dict[int, bytes],
    file: BinaryIO | ObjectReader,
) -> None:
    """File ``info`` under its key if it is an image or a label (WebDataset's grouping); note in
    ``dotted`` a member that would be one but for a dot in its key (``img.0001.jpg``). A label's
    bytes are read now, where the walk is (a remote shard's window holds them)."""
    name = info.name
    if not info.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return  # WebDataset skips these too
    match = _KEY.match(info.name)
    if match is None:
        return
    key, field = match.group(1), match.group(2).lower()
    if field not in _IMAGE_FIELDS and field != _LABEL_FIELD:
        if field.rpartition(".")[2] in (*_IMAGE_FIELDS, _LABEL_FIELD):
            dotted.setdefault(key, info.name)  # a sample if its key had no dot (_complete)
        return
    if info.offset_data + info.size > end:
        raise DatasetError(
            f"shard {shard} is truncated: member {info.name} runs past its end "
            f"({info.offset_data + info.size} > {end} bytes)"
        )
    if info.issparse():
        raise DatasetError(f"shard {shard}: member {info.name} is a sparse file; store it whole")
    sample = samples.setdefault(key, _Sample())
    slot = "label" if field == _LABEL_FIELD else "image"
    held = getattr(sample, slot)
    if held is not None:
        what = f"two .{_LABEL_FIELD} members" if slot == "label" else "two images"
        raise DatasetError(f"shard {shard}: key {key!r} has {what}: {held.name} and {info.name}")
    setattr(sample, slot, _Member(info.name, info.offset_data, info.size))
    if slot == "label" and info.size <= _MAX_LABEL_BYTES:
        file.seek(info.offset_data)  # tarfile seeks to the next header itself
        texts[info.offset_data] = file.read(info.size)


def _check_end_marker(
    shard: Shard, file: BinaryIO | ObjectReader, archive_end: int, end: int
) -> None:
    """A tar ends with zero blocks; anything else after the last member means the shard was cut
    inside a header (``tarfile`` stops there without a word)."""
    file.seek(archive_end)
    rest = file.read(min(end - archive_end, tarfile.BLOCKSIZE))
    if len(rest) < tarfile.BLOCKSIZE or rest.count(0) != len(rest):
        raise DatasetError(
            f"shard {shard} is truncated: no end-of-archive blocks after its last whole member "
            f"(byte {archive_end} of {end}); write the shard again"
        )


def _complete(
    shard: Shard, samples: dict[str, _Sample], dotted: dict[str, str]
) -> dict[str, _Sample]:
    """The samples in the order of their image members; a key without both members refused, and
    images or labels that a dot in their key hides from every sample (never dropped unsaid)."""
    hidden = [name for key, name in dotted.items() if key not in samples]
    if hidden:
        raise DatasetError(
            f"shard {shard}: member {hidden[0]} is not an image or label of any sample: a "
            "WebDataset key ends at the first dot of the base name, so its key is "
            f"{_KEY.match(hidden[0]).group(1)!r} ({len(hidden)} such key(s) in this shard); "
            "rename the members without dots in their keys (e.g. img_0001.jpg)"
        )
    for key, sample in samples.items():
        if sample.image is None:
            raise DatasetError(
                f"shard {shard}: key {key!r} has no image member (extensions: "
                f"{', '.join(sorted(_IMAGE_FIELDS))}), only {sample.label.name}"
            )
        if sample.label is None:
            raise DatasetError(
                f"shard {shard}: key {key!r} ({sample.image.name}) has no .{_LABEL_FIELD} member "
                "(its class index as text, the WebDataset convention)"
            )
    return dict(sorted(samples.items(), key=lambda item: item[1].image.offset))


def _label(shard: Shard, sample: _Sample, texts: dict[int, bytes]) -> int:
    """The class index in the key's ``cls`` member (``fastkd.data.labels``' rule; whitespace
    and a UTF-8 BOM around it)."""
    if sample.label.size > _MAX_LABEL_BYTES:
        raise DatasetError(
            f"shard {shard}: {sample.label.name} holds {sample.label.size} bytes, not a class "
            "index (0, 1, 2, ... as text)"
        )
    text = texts[sample.label.offset].decode("utf-8-sig", errors="replace")
    return parse_label(text, f"{shard}:{sample.label.name}")
