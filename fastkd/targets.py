"""The one adapter from a store to the loss: which columns teach a student, and the store's rows
as the kernels' ``PoolTargets``.

A store reads numpy (``fastkd.store``: ``PoolArrays``, the stacked rows of several models, the
tail model already a ``TailModel``); the kernels take torch tensors (``PoolTargets``). Training
and the Python API (and the benchmarks, through training) cross here, so the array names stay
the same from disk to kernel and the columns a student is taught from follow one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fastkd.choices import PartitionMode
from fastkd.compression import DEFAULT_TAIL
from fastkd.errors import ConfigError
from fastkd.kernels import TARGET_FIELDS, PoolTargets
from fastkd.kernels.targets import teacher_lse
from fastkd.store import PoolArrays

# Host tensors from a batch's arrays, some converted (``fastkd.training.transfer.PinnedRing.fill``
# of a slot stages them in pinned memory).
ToTensors = Callable[
    [Mapping[str, np.ndarray | None], Mapping[str, torch.dtype]], Mapping[str, torch.Tensor | None]
]
# The dtypes the kernels take, made here on the host (not a cast a step on the device): int64
# ids, fp32 row statistics (a store keeps log_tail_sqrt in fp16).
_DTYPES = {
    "topk_ids": torch.int64,
    "tail_ids": torch.int64,
    "log_tail": torch.float32,
    "log_tail_sqrt": torch.float32,
    "true_logprob": torch.float32,
}


def target_columns(
    pool: Sequence[str], student: str, mode: PartitionMode | str = PartitionMode.LIVE
) -> tuple[list[str], int | None]:
    """The target columns a student is taught from, and its own column: the pool's members but
    the student (never its own teacher), and in ``fixed`` mode, last, the student's own initial
    outputs (``self_index``; None in the other modes)."""
    teachers = [name for name in pool if name != student]
    if not teachers:
        raise ConfigError(f"the pool {list(pool)} has no teacher besides the student {student!r}")
    try:
        mode = PartitionMode(mode)
    except ValueError:
        modes = ", ".join(m.value for m in PartitionMode)
        raise ConfigError(f"partition mode {mode!r} is not one of {modes}") from None
    if mode is PartitionMode.FIXED:
        return [*teachers, student], len(teachers)
    return teachers, None


def pool_targets(
    arrays: PoolArrays,
    to_tensors: ToTensors | None = None,
    temperature: float = 1.0,
    mixing: Callable[[PoolTargets], PoolTargets] | None = None,
) -> PoolTargets:
    """A store's stacked rows (``StoreReader.read_pool``) as the kernels' host tensors, made by
    ``to_tensors`` (default: tensors over the arrays' memory; ids as int64 and row statistics as
    fp32 either way). Dense
    rows read for a loss at ``temperature`` != 1 carry the teachers' log-sum-exp at it
    (``PoolTargets.logprobs_lse``), computed here, in the reading thread, so the kernel's first
    pass reads the student alone. ``mixing`` (plain KD's ``plain_targets``) turns the rows into
    the one column the loss reads, here on the host too, before ``to_tensors``."""
    fields = {name: getattr(arrays, name, None) for name in TARGET_FIELDS}
    tail = arrays.tail or DEFAULT_TAIL
    lse_temperature = None
    if mixing is not None:
        mixed = mixing(PoolTargets(**_as_tensors(fields, _DTYPES), tail=tail))
        fields = {name: _numpy(getattr(mixed, name)) for name in TARGET_FIELDS}
        tail, lse_temperature = mixed.tail, mixed.lse_temperature
    elif fields["logprobs"] is not None and float(temperature) != 1.0:
        lse = teacher_lse(torch.from_numpy(np.ascontiguousarray(fields["logprobs"])), temperature)
        fields["logprobs_lse"], lse_temperature = lse.numpy(), float(temperature)
    tensors = (to_tensors or _as_tensors)(fields, _DTYPES)
    return PoolTargets(**tensors, tail=tail, lse_temperature=lse_temperature)


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.numpy()


def _as_tensors(
    arrays: Mapping[str, np.ndarray | None], dtypes: Mapping[str, torch.dtype]
) -> dict[str, torch.Tensor | None]:
    out: dict[str, torch.Tensor | None] = {}
    for name, values in arrays.items():
        tensor = None if values is None else torch.from_numpy(np.ascontiguousarray(values))
        out[name] = tensor if tensor is None else tensor.to(dtypes.get(name, tensor.dtype))
    return out
