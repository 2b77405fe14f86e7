"""Data sets and the loaders that replay stored views, preprocessed for every model of a pool.

- ``decoding``: the one rule all loaders decode an image file by, mode by mode (``decode_rgb``;
  ``refusal`` of the modes it has no rule for); the image file extensions.
- ``labels``: the one rule a label's text is read by (``parse_label``), below ``MAX_CLASSES``.
- ``wholeness``: is this the whole encoded image? (``incomplete``: each format's structure
  from its bytes, no pixel decoded), asked before either loader decodes a file.
- ``shard_cache``: each tar shard's scan cached on disk, keyed by the shard's path and stat (on
  object storage: URL, size and ETag).
- ``shard_members``: a tar shard's image members read by offset (``ShardMembers.read``, one
  ``pread``; on object storage by byte range, a batch at once: ``read_many``) or opened as files
  (``ShardMembers.open``).
- ``shards``: WebDataset tar shards indexed on open (``index_shards``: each image member's
  shard, offset and size; its key and ``cls`` label).
- ``datasets``: image folders, file lists and tar shards (``open_dataset``, ``ImageDataset``):
  keys, labels, file sizes, header sizes, fingerprints; where a sample's bytes come from
  (``read_bytes``) and what messages call it (``name``).
- ``batches``: what the loader backends share: ``Preprocess`` per data config, the item list
  and its one gate before decoding (``Items.checked_bytes``, ``checked_batch``), PIL's decoding of a view
  (``load_view``, ``normalize``), ``plan_batches``, ``ViewBatch``, the handling of unreadable
  images and the workers' ``DataLoader`` (``worker_loader``).
- ``dali``: the DALI backend (the one module that imports ``nvidia.dali``, lazily).
- ``nvjpeg``: the nvjpeg backend: JPEGs decoded on the device by torchvision (nvJPEG on a GPU)
  and resized there as PIL resizes (``resize_like_pil``), the other images by PIL in the workers.
- ``loader``: ``view_loader`` (checks, picks the backend: ``resolve_backend``) and the torch
  ``DataLoader`` backend.

Imports go one way, no cycles: ``decoding``, ``labels``, ``shard_cache``, ``shard_members``
and ``wholeness`` import no other module of the package; ``shards`` imports ``decoding``,
``labels``, ``shard_cache`` and ``shard_members``; ``datasets`` imports ``decoding``, ``labels``,
``shard_members`` and ``shards``; ``batches`` imports ``datasets``, ``decoding`` and
``wholeness``; ``dali`` imports ``batches`` and ``decoding``; ``nvjpeg`` imports ``batches``;
``loader`` imports ``batches``, ``dali``, ``datasets`` and ``nvjpeg``; this ``__init__``
re-exports the public names callers use (a shard data set is opened by ``open_dataset`` like any
other). Outside the package they import only
``fastkd.errors`` (whose ``DatasetError`` and ``BadImageError`` are re-exported here too),
``fastkd.hashing``, ``fastkd.storage`` (shards on object storage; in ``batches`` the workers'
process context) and, in ``batches``, ``fastkd.views`` (``pixel_box``); none imports
fastkd.data.
"""

from fastkd.data.batches import Preprocess, ViewBatch, load_view, plan_batches
from fastkd.data.datasets import IMAGE_EXTENSIONS, ImageDataset, content_hashes, open_dataset
from fastkd.data.decoding import decode_rgb
from fastkd.data.loader import resolve_backend, view_loader
from fastkd.errors import BadImageError, DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "DatasetError",
    "ImageDataset",
    "Preprocess",
    "ViewBatch",
    "content_hashes",
    "decode_rgb",
    "load_view",
    "open_dataset",
    "plan_batches",
    "resolve_backend",
    "view_loader",
]
