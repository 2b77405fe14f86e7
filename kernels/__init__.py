"""Fused Triton kernels for knowledge distillation, each beside its torch reference.

Triton on CUDA tensors, the Triton interpreter on CPU when ``TRITON_INTERPRET=1`` was set before
this import, the torch reference otherwise (see ``fastkd.kernels.common``).

Modules, each importing only those listed before it: ``launch`` (every launch, or its record),
``grad_scale`` (the backward's grad_output pass), ``common`` (what the losses share), ``tiling``
(a launch's tile, warps, stages and register cap from its launcher's table), ``row_grid`` (how
many programs a launch runs, each taking several rows), ``targets``
(``PoolTargets``), ``sparse_target`` and ``partitioned_tiles`` (the partitioned kernel's work in
registers); then for each loss, partitioned then bidirectional, ``*_kernel`` (the Triton kernel
and its launcher) and ``*_reference`` (the torch reference, which defines the rule); ``ops``
(both losses registered with torch as custom ops, ``fastkd::*_kd``, which run one or the other);
then for each loss ``*_kd`` (the config and the public loss, which runs the kernel through an
autograd Function eagerly and through its op under ``torch.compile``). A kernel, its
reference and the ops name the losses' configs in type hints only.
"""

from fastkd.choices import Reduction
from fastkd.kernels.bidirectional_kd import (
    BidirectionalKDConfig,
    BidirectionalKDLoss,
    bidirectional_kd_loss,
    bidirectional_kd_trusted,
)
from fastkd.kernels.bidirectional_reference import bidirectional_kd_reference
from fastkd.kernels.common import KDStats
from fastkd.kernels.partitioned_kd import (
    PartitionedKDConfig,
    PartitionedKDLoss,
    partitioned_kd_loss,
    partitioned_kd_trusted,
)
from fastkd.kernels.partitioned_reference import partitioned_kd_reference
from fastkd.kernels.targets import TARGET_FIELDS, PoolTargets

__all__ = [
    "TARGET_FIELDS",
    "BidirectionalKDConfig",
    "BidirectionalKDLoss",
    "KDStats",
    "PartitionedKDConfig",
    "PartitionedKDLoss",
    "PoolTargets",
    "Reduction",
    "bidirectional_kd_loss",
    "bidirectional_kd_reference",
    "bidirectional_kd_trusted",
    "partitioned_kd_loss",
    "partitioned_kd_reference",
    "partitioned_kd_trusted",
]
