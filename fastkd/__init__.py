"""fastkd: offline, role-agnostic knowledge transfer across a pool of pretrained models.

The public Python API is named here; each name is imported from its module on first use, so
``import fastkd`` (and the ``fastkd`` command, a subpackage) stays free of torch until a name
that needs it is used:

- a store and its rows: ``open_store``, ``StoreReader``, ``epoch_rows``, ``read_targets``,
  ``target_columns``, ``PoolTargets``;
- a view rebuilt from one's own image file: ``ViewTransform``;
- the losses: ``partitioned_kd_loss`` / ``PartitionedKDLoss``, ``bidirectional_kd_loss`` /
  ``BidirectionalKDLoss``, their settings ``LossSettings``, ``KDStats``, ``PartitionMode``;
- data and models: ``open_dataset``, ``load_model``;
- the command's runs from Python: ``TrainConfig``, ``train``, ``train_all``;
- the one error root: ``FastKDError``.

``examples/own_loop.py`` trains a student with them in a plain torch loop.

The root-level folders kernels/, cli/ and bench/ are the subpackages fastkd.kernels, fastkd.cli
and fastkd.bench (pyproject.toml maps them), so use an installed checkout: ``pip install -e .``
(``--no-deps --no-build-isolation`` where there is no network).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastkd.version import __version__

_HOMES = {
    "open_store": "fastkd.api",
    "epoch_rows": "fastkd.api",
    "read_targets": "fastkd.api",
    "ViewTransform": "fastkd.api",
    "StoreReader": "fastkd.store",
    "target_columns": "fastkd.targets",
    "PoolTargets": "fastkd.kernels",
    "KDStats": "fastkd.kernels",
    "partitioned_kd_loss": "fastkd.kernels",
    "PartitionedKDLoss": "fastkd.kernels",
    "bidirectional_kd_loss": "fastkd.kernels",
    "BidirectionalKDLoss": "fastkd.kernels",
    "PartitionMode": "fastkd.choices",
    "LossSettings": "fastkd.loss_settings",
    "open_dataset": "fastkd.data",
    "load_model": "fastkd.models",
    "TrainConfig": "fastkd.training",
    "train": "fastkd.training",
    "train_all": "fastkd.training",
    "FastKDError": "fastkd.errors",
}

__all__ = [  # the names of _HOMES (a test holds them equal), literal for linters and IDEs
    "BidirectionalKDLoss",
    "FastKDError",
    "KDStats",
    "LossSettings",
    "PartitionMode",
    "PartitionedKDLoss",
    "PoolTargets",
    "StoreReader",
    "TrainConfig",
    "ViewTransform",
    "__version__",
    "bidirectional_kd_loss",
    "epoch_rows",
    "load_model",
    "open_dataset",
    "open_store",
    "partitioned_kd_loss",
    "read_targets",
    "target_columns",
    "train",
    "train_all",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from fastkd.api import ViewTransform, epoch_rows, open_store, read_targets
    from fastkd.choices import PartitionMode
    from fastkd.data import open_dataset
    from fastkd.errors import FastKDError
    from fastkd.kernels import (
        BidirectionalKDLoss,
        KDStats,
        PartitionedKDLoss,
        PoolTargets,
        bidirectional_kd_loss,
        partitioned_kd_loss,
    )
    from fastkd.loss_settings import LossSettings
    from fastkd.models import load_model
    from fastkd.store import StoreReader
    from fastkd.targets import target_columns
    from fastkd.training import TrainConfig, train, train_all
