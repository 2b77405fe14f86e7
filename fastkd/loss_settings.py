"""``LossSettings``: how a KD loss is computed, one typed value from the option to the kernel.

The options of the loss (the partition mode and score, the temperature, the weights of the KD
and cross-entropy terms, the stop-gradient of joint Bi-KD, the reduction) are one frozen
dataclass, checked once here with one rule per field: the CLI and the presets make one,
``TrainConfig`` holds it, the teaching strategies hand it to the loss functions and the kernels'
configs are built from it. Light: no torch, so the CLI builds it at start-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fastkd.choices import PartitionMode, PartitionScore, Reduction, Teachers, option_flag
from fastkd.errors import ConfigError


@dataclass(frozen=True)
class LossSettings:
    """A KD loss's settings; ``fastkd train``'s options of the same names (docs/method.md)."""

    mode: PartitionMode = PartitionMode.LIVE  # who teaches each row (``fastkd.partition``)
    partition_score: PartitionScore = PartitionScore.LABEL  # what the partition compares
    temperature: float = 1.0  # T: distributions at softmax(z / T), the KD term times T^2
    kd_weight: float = 1.0  # loss = ce_weight x CE + kd_weight x T^2 x KL
    ce_weight: float = 1.0
    stop_grad: bool = True  # joint Bi-KD: no KD gradient into the teaching model
    reduction: Reduction = Reduction.MEAN

    def __post_init__(self) -> None:
        problems = []
        for name, kind in (
            ("mode", PartitionMode),
            ("partition_score", PartitionScore),
            ("reduction", Reduction),
        ):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                choices = [member.value for member in kind]
                label = "reduction" if name == "reduction" else option_flag(name)  # no option
                problems.append(f"{label} must be one of {choices}, got {getattr(self, name)!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            problems.append(f"--temperature must be positive and finite, got {self.temperature}")
        for name in ("kd_weight", "ce_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                problems.append(f"{option_flag(name)} must be finite and >= 0, got {value}")
        if self.mode == PartitionMode.PLAIN and self.partition_score == PartitionScore.CONFIDENCE:
            problems.append(
                "--partition-score: plain KD has no partition (the teachers' mixture teaches every "
                "row); --partition-score applies to --mode live, fixed and best"
            )
        if problems:
            raise ConfigError("invalid loss settings: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LossSettings:
        """Inverse of ``to_dict`` (a saved run's configuration)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: enums as their values."""
        return {k: v.value if isinstance(v, PartitionMode | PartitionScore | Reduction) else v
                for k, v in asdict(self).items()}  # fmt: skip


LOSS_FIELDS = tuple(f.name for f in fields(LossSettings))  # flat in the configs saved before


# The loss settings each way of teaching reads (its loss's config: tests/test_presets.py checks
# them against the kernels'), and for some it does not read, the value it acts as: stored and
# frozen teachers get no gradient (stop_grad), joint Bi-KD's partition is always the current
# models' p(y) (live, label), cross-entropy alone is CE at weight 1.
_PARTITIONED = frozenset({"mode", "partition_score", "temperature", "kd_weight", "ce_weight"})
TEACHING_READS: dict[str, tuple[frozenset[str], dict[str, Any]]] = {
    "joint": (
        frozenset({"temperature", "kd_weight", "ce_weight", "stop_grad"}),
        {"mode": PartitionMode.LIVE, "partition_score": PartitionScore.LABEL},
    ),
    Teachers.OFFLINE.value: (_PARTITIONED, {"stop_grad": True}),
    Teachers.LIVE.value: (_PARTITIONED, {"stop_grad": True}),
    Teachers.NONE.value: (frozenset(), {"ce_weight": 1.0, "stop_grad": True}),
}
TEACHING_TEXT = {  # each way of teaching as messages name it
    "joint": "--joint (every --model trains at once, the bidirectional loss)",
    Teachers.OFFLINE.value: "--teachers offline (one student, the store's targets)",
    Teachers.LIVE.value: "--teachers live (one student, frozen teachers run every step)",
    Teachers.NONE.value: "--teachers none (cross-entropy alone, no teacher)",
}


def teaching_way(joint: bool, teachers: Teachers | str) -> str:
    """The key of a run's way of teaching in ``TEACHING_READS``: joint, else its teachers."""
    return "joint" if joint else Teachers(teachers).value


def unapplied(values: Mapping[str, Any], joint: bool, teachers: Teachers | str) -> list[str]:
    """The loss settings of ``values`` that the way of teaching does not apply: it does not read
    them and does not act as their value either (``--no-stop-grad`` without ``--joint``)."""
    reads, acts_as = TEACHING_READS[teaching_way(joint, teachers)]
    absent = object()
    return [
        name
        for name, value in values.items()
        if name in LOSS_FIELDS and name not in reads and acts_as.get(name, absent) != value
    ]
