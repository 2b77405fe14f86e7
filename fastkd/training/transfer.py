"""Host-to-device copies that never make the training loop wait: page-locked staging.

``tensor.to(cuda, non_blocking=True)`` is only asynchronous from page-locked (pinned) memory;
from ordinary memory the host copies through a staging buffer and waits. So what training sends
every step (the stored targets) goes through ``PinnedRing``, a few reusable pinned buffers per
field; what it sends once (an epoch's labels) through ``to_device``. On a CPU device both are
plain tensors: there is nothing to copy to.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor


class PinnedRing:
    """``slots`` sets of pinned buffers, one buffer per field, filled in turn by a reader thread.

    A slot may be refilled only once the copy that last read it has finished. ``sent(slot)``
    records a CUDA event on the current stream right after that copy is queued, and ``fill``
    waits on that event (in the reader's thread, never the training loop's) before it
    overwrites the slot. With ``PREFETCH_STEPS + 1`` slots the slot of step t + P + 1 is step
    t's, whose copy was queued before step t's compute: by then it has almost always finished,
    so the wait is a formality. Buffers are allocated on first use at the size asked for and
    grow if a later fill needs more rows. On a CPU device no buffer is made: ``fill`` returns
    the arrays as tensors and ``sent`` does nothing.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self._buffers: list[dict[str, Tensor]] = [{} for _ in range(slots)]
        self._events: list[torch.cuda.Event | None] = [None] * slots

    def fill(
        self,
        slot: int,
        arrays: Mapping[str, np.ndarray | None],
        dtypes: Mapping[str, torch.dtype] | None = None,
    ) -> dict[str, Tensor | None]:
        """The arrays as host tensors (``dtypes`` converts some), in ``slot``'s pinned buffers
        on CUDA. Called by the thread that reads ahead; None fields stay None."""
        dtypes = dtypes or {}
        if self.pinned and self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this slot is done
        out: dict[str, Tensor | None] = {}
        for name, values in arrays.items():
            if values is None:
                out[name] = None
                continue
            source = torch.from_numpy(np.ascontiguousarray(values))
            dtype = dtypes.get(name, source.dtype)
            if not self.pinned:
                out[name] = source.to(dtype)
                continue
            buffer = self._buffers[slot].get(name)
            if (
                buffer is None
                or buffer.dtype != dtype
                or buffer.shape[1:] != source.shape[1:]
                or buffer.shape[0] < source.shape[0]
            ):
                buffer = torch.empty(source.shape, dtype=dtype, pin_memory=True)
                self._buffers[slot][name] = buffer
            out[name] = buffer[: source.shape[0]].copy_(source)
        return out

    def sent(self, slot: int) -> None:
        """Mark ``slot``'s buffers in flight: their copies to the device were just queued on
        the current stream (call it from the thread that queued them)."""
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self._events[slot] = event


def to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """``values`` on ``device`` without the host waiting: staged in pinned memory on CUDA.

    The staging tensor is dropped at once: torch's pinned-memory allocator records the copy's
    stream and reuses the block only after the copy has finished.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
