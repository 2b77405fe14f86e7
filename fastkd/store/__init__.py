"""The soft-target store: a sharded, compressed Zarr v3 group of per-(sample, view) pool outputs.

One home for the on-disk format (``docs/store-format.md`` describes it for plain-zarr readers).
Its modules, one idea each; the public names are re-exported here (``from fastkd.store import
StoreReader``), the modules' other names are the package's own business:

- ``schema``: the stored manifest attribute's JSON types, ranges and keys, checked on open.
- ``manifest``: what a store holds (``Manifest``, ``ModelEntry``, ``StoreLayout``), comparing
  manifests and checking a store against an ``Expectation``, reading a store's manifest.
- ``encoding``: full logits -> the stored arrays by ``fastkd.compression``'s rule (dense or
  sparse: ``resolve_topk``; ``encode_logits``), and the arrays of a model.
- ``arrays``: the store's array names, shards, chunks and codecs; creating a new store;
  checking a store's arrays against its manifest.
- ``claims``: a rank's part ``i/n`` of the blocks, the creation lock and the writers' claims.
- ``creation``: creating a store, or checking that the one there is the same (resume).
- ``writer``: ``StoreWriter``: create or resume a store, write blocks and their markers.
- ``block_cache``: decoded blocks in a fixed arena, rows gathered with numpy, each block checked.
- ``reader``: ``StoreReader``: validated, random access through a cache of decoded blocks.
- ``summary``: ``summarize``: sizes and stored bytes (``fastkd inspect``).
- ``integrity``: the content hash of every block of every array, checked as the reader decodes
  it; ``check_store`` verifies a whole store (``fastkd inspect --verify``, ``dump --repair``).

Imports run one way, so there is no cycle (a module imports only those listed for it):

    schema      <- (none of the others)
    manifest    <- schema
    encoding    <- manifest
    arrays      <- manifest, encoding
    claims      <- (none of the others)
    integrity   <- manifest, arrays
    creation    <- manifest, arrays, claims, integrity
    writer      <- manifest, encoding, arrays, claims, integrity, creation
    block_cache <- integrity
    reader      <- manifest, encoding, arrays, integrity, block_cache
    summary     <- manifest, encoding, arrays

Vocabulary: a *shard* is zarr's (the sharding codec's file, ``samples_per_shard`` samples of one
array) and a *block* is one shard of every array, the unit of writing and resume; a *part* is a
rank's slice ``i/n`` of the blocks (``--part``). The store's errors live in ``fastkd.errors``.
"""

from fastkd.errors import StoreBusyError, StoreError, StoreMismatchError
from fastkd.store.arrays import SHARED_ARRAYS, ZSTD_LEVEL
from fastkd.store.claims import CLAIM_STALE_S, HEARTBEAT_S, LOCK_WAIT_S, resolve_part
from fastkd.store.encoding import (
    DENSE_MAX_CLASSES,
    DENSE_SLACK,
    encode_logits,
    id_dtype,
    resolve_topk,
)
from fastkd.store.integrity import BadBlock, check_store
from fastkd.store.manifest import (
    CHUNK_SAMPLES,
    FORMAT_VERSION,
    MANIFEST_ATTR,
    STATUS_ATTR,
    TARGET_VIEWS_PER_SHARD,
    Expectation,
    Manifest,
    ModelEntry,
    StoreLayout,
    default_samples_per_shard,
    manifest_differences,
    open_manifest,
)
from fastkd.store.reader import DEFAULT_CACHE_BYTES, ModelTargets, PoolArrays, StoreReader
from fastkd.store.summary import ArraySummary, StoreSummary, summarize
from fastkd.store.writer import StoreWriter

__all__ = [
    "CHUNK_SAMPLES",
    "CLAIM_STALE_S",
    "DEFAULT_CACHE_BYTES",
    "DENSE_MAX_CLASSES",
    "DENSE_SLACK",
    "FORMAT_VERSION",
    "HEARTBEAT_S",
    "LOCK_WAIT_S",
    "MANIFEST_ATTR",
    "SHARED_ARRAYS",
    "STATUS_ATTR",
    "TARGET_VIEWS_PER_SHARD",
    "ZSTD_LEVEL",
    "ArraySummary",
    "BadBlock",
    "Expectation",
    "Manifest",
    "ModelEntry",
    "ModelTargets",
    "PoolArrays",
    "StoreBusyError",
    "StoreError",
    "StoreLayout",
    "StoreMismatchError",
    "StoreReader",
    "StoreSummary",
    "StoreWriter",
    "check_store",
    "default_samples_per_shard",
    "encode_logits",
    "id_dtype",
    "manifest_differences",
    "open_manifest",
    "resolve_part",
    "resolve_topk",
    "summarize",
]
