"""Fused Triton kernels for knowledge distillation, each beside its torch reference.

Triton on CUDA tensors, the Triton interpreter on CPU when ``TRITON_INTERPRET=1`` was set before
this import, the torch reference otherwise (see ``fastkd.kernels.common``).

Modules, each importing only those listed before it: ``launch`` (every launch, or its record),
``grad_scale`` (the backward's grad_output pass), ``common`` (what the losses share), ``targets``
(``PoolTargets``), ``sparse_target`` and ``partitioned_tiles`` (the partitioned kernel's work in
registers); then for each loss, partitioned then bidirectional, ``*_kernel`` (the Triton kernel
and its launcher), ``*_reference`` (the torch reference, which defines the rule) and ``*_kd``
(the config and the public loss, which runs one or the other). A kernel and its reference name
their loss's config in type hints only.
"""

from fastkd.choices import Reduction
from fastkd.kernels.bidirectional_kd import (
    BidirectionalKDConfig,
    BidirectionalKDLoss,
    bidirectional_kd_loss,
)
from fastkd.kernels.bidirectional_reference import bidirectional_kd_reference
from fastkd.kernels.common import KDStats
from fastkd.kernels.partitioned_kd import (
    PartitionedKDConfig,
    PartitionedKDLoss,
    partitioned_kd_loss,
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
    "partitioned_kd_loss",
    "partitioned_kd_reference",
]
