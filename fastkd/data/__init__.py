"""Data sets and the loaders that replay stored views, preprocessed for every model of a pool.

- ``datasets``: image folders and file lists (``open_dataset``, ``ImageDataset``): keys, labels,
  file sizes, header sizes, fingerprints.
- ``batches``: what both loader backends share: ``Preprocess`` per data config, the item list,
  ``plan_batches``, ``ViewBatch`` and the handling of unreadable images.
- ``dali``: the DALI backend (the one module that imports ``nvidia.dali``, lazily).
- ``loader``: ``view_loader`` (checks, picks the backend: ``resolve_backend``) and the torch
  ``DataLoader`` backend (``load_view``).

Imports go one way, no cycles: ``datasets`` imports no other module of the package; ``batches``
imports ``datasets``; ``dali`` imports ``batches``; ``loader`` imports ``batches``, ``dali`` and
``datasets``; this ``__init__`` re-exports the public names of all four. Outside the package
they import only ``fastkd.errors`` (whose ``DatasetError`` and ``BadImageError`` are re-exported
here too) and, in ``batches``, ``fastkd.views`` (``pixel_box``); neither imports fastkd.data.
"""

from fastkd.data.batches import OnBadImage, Preprocess, ViewBatch, plan_batches
from fastkd.data.datasets import IMAGE_EXTENSIONS, ImageDataset, open_dataset
from fastkd.data.loader import Backend, load_view, resolve_backend, view_loader
from fastkd.errors import BadImageError, DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Backend",
    "BadImageError",
    "DatasetError",
    "ImageDataset",
    "OnBadImage",
    "Preprocess",
    "ViewBatch",
    "load_view",
    "open_dataset",
    "plan_batches",
    "resolve_backend",
    "view_loader",
]
