"""``fastkd train --compile``: the learners' forward and the strategy's loss as one compiled function.

``torch.compile(fullgraph=True)`` traces every learner's forward on the batch's images, the live
teachers' forward where they run, and the loss, the registered op ``fastkd::partitioned_kd`` or
``fastkd::bidirectional_kd`` (``kernels.ops``) or cross-entropy, into one graph; its backward is
compiled with it. A graph break is an error, not a silent fall back to eager.

Shapes are static (``dynamic=False``): a run compiles twice at most, once for its full batches
and once for the last, shorter batch of an epoch, and every later step reuses one of the two. The
loss's config for each ``scale`` (which differs for the short batch) is made before the call
(``TeachingStrategy.loss_config``): the trace finds it in the strategy's cache, and the traced
``scale`` is guarded by its value, so it costs no recompile per step.

``FASTKD_COMPILE_BACKEND`` names the ``torch.compile`` backend (default ``inductor``, which needs
a C++ compiler on CPU and Triton on a GPU); the tests use ``aot_eager``, which traces the same
graph without generating code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from fastkd.kernels import KDStats
from fastkd.runtime import autocast
from fastkd.training.learners import Learner
from fastkd.training.plan import Batch
from fastkd.training.strategy import TeachingStrategy

BACKEND_ENV = "FASTKD_COMPILE_BACKEND"
DEFAULT_BACKEND = "inductor"


def compile_backend() -> str:
    """The ``torch.compile`` backend of ``--compile``: ``$FASTKD_COMPILE_BACKEND`` or inductor."""
    return os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND


class CompiledLoss:
    """``Trainer.loss`` as one ``torch.compile``'d function of the batch and ``scale``."""

    def __init__(
        self,
        learners: Sequence[Learner],
        teaching: TeachingStrategy,
        device: torch.device,
        amp: bool,
        backend: str | None = None,
    ) -> None:
        self.learners = list(learners)
        self.teaching = teaching
        self.device = device
        self.amp = amp
        self.backend = backend or compile_backend()
        self._compiled = torch.compile(
            self._loss, backend=self.backend, fullgraph=True, dynamic=False
        )

    def __call__(self, batch: Batch, scale: float) -> tuple[Tensor, KDStats | None, list[Tensor]]:
        """The loss summed over the batch's rows times ``scale``, the per-row statistics (None
        without KD) and the learners' logits, as ``Trainer.loss`` gives them."""
        self.teaching.loss_config(scale)  # made here: the trace only reads it
        return self._compiled(batch, scale)

    def _loss(self, batch: Batch, scale: float) -> tuple[Tensor, KDStats | None, list[Tensor]]:
        with autocast(self.device, self.amp):
            logits = [learner.forward(batch.images[learner.stream]) for learner in self.learners]
        loss, stats = self.teaching.loss(logits, batch, scale)
        return loss, stats, logits
