"""Fused Triton kernels for knowledge distillation, each beside its torch reference.

Triton on CUDA tensors, the Triton interpreter on CPU when ``TRITON_INTERPRET=1`` was set before
this import, the torch reference otherwise (see ``fastkd.kernels.common``).
"""

from fastkd.kernels.bidirectional_kd import (
    BidirectionalKDConfig,
    BidirectionalKDLoss,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
)
from fastkd.kernels.common import KDStats, Reduction
from fastkd.kernels.partitioned_kd import (
    PartitionedKDConfig,
    PartitionedKDLoss,
    partitioned_kd_loss,
    partitioned_kd_reference,
)
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
