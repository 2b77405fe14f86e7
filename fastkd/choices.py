"""The named choices and defaults of fastkd's options, in a module that imports nothing heavy.

The CLI builds its options (their types, choices and defaults) from these at start-up, so
``fastkd --help`` and a typo answer without importing torch, timm or DALI. The library modules
that act on them (``partition``, ``loss_settings``, ``training``, ``data``, the kernels) import
them from here, and so does every caller: one home each.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

# The image pipeline; auto = DALI when installed, else nvjpeg (torchvision decodes the JPEGs on
# the GPU) on a CUDA device, else torch (PIL in DataLoader workers).
Backend = Literal["auto", "dali", "torch", "nvjpeg"]
OnBadImage = Literal["fail", "skip"]  # an unreadable image: stop, or flag it and carry on

DEFAULT_BATCH_SIZE = 128  # images per optimizer step, all ranks together
DEFAULT_LR = {"adam": 1e-6, "sgd": 1e-4}  # Bi-KD (Adam) and KL+DP (SGD) on pretrained models


class Teachers(str, Enum):
    """Where the KD targets come from."""

    OFFLINE = "offline"  # the store
    LIVE = "live"  # the pool's models, run forward every step
    NONE = "none"  # no KD: cross-entropy only


class PartitionMode(str, Enum):
    """How a sample's target is chosen (docs/method.md). ``"all"``, the old name of ``best``, is
    still read (saved configs)."""

    LIVE = "live"  # offline Bi-KD: the best teacher teaches where it beats the current student
    FIXED = "fixed"  # KL+DP: the best of {the student's stored initial outputs, the teachers}
    BEST = "best"  # best-teacher KD: the best teacher by the score teaches on every sample
    PLAIN = "plain"  # plain KD: the teachers' mean distribution at T; no label, no partition

    @classmethod
    def _missing_(cls, value: object) -> PartitionMode | None:
        return cls.BEST if isinstance(value, str) and value.lower() == "all" else None


class PartitionScore(str, Enum):
    """What the partition compares, for teachers and the student alike (at T = 1)."""

    LABEL = "label"  # log p(y): needs the label
    CONFIDENCE = "confidence"  # max_c log p(c), the confidence in the top class: no label


class Reduction(str, Enum):
    """How a loss's per-row values become the loss."""

    NONE = "none"
    MEAN = "mean"  # over the rows whose label is not ignore_index; 0 when every row is ignored
    SUM = "sum"


def option_flag(field_name: str) -> str:
    """The ``fastkd train`` option of a ``TrainConfig`` field, as help and messages name it."""
    return "--" + field_name.replace("_", "-")
