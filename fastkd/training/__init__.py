"""``fastkd train``: one training loop for every way a pool member learns.

Modules, each importing only those before it: ``config`` (TrainConfig), ``plan`` (which rows each
step trains on), ``learners`` (the models trained, their fused optimisers), ``transfer`` (pinned
host-to-device copies), ``strategy`` (ways of teaching: stored targets, live teachers, none,
joint Bi-KD), ``state`` (the resumable run state), ``steps`` (a step's record, read one step
late; skipping a non-finite step on the device), ``validation`` (top-1 on held-out data, shared by
the ranks), ``summary`` (summary.csv and TensorBoard scalars per epoch), ``report`` (the
transfer report, the control), ``run_folder`` (what a run writes in its folder, and what it must
not replace), ``store_match`` (the store is the data's, and each step's image files the dump's),
``checkpointing`` (the weights selected on val, the run state saved and loaded), ``compiled``
(--compile: the forward and loss as one compiled function), ``result``
(``TrainResult``, the report's models), ``trainer`` (the loop: plan, step, epochs), ``run``
(train, train_all).
"""

from fastkd.errors import NonFiniteError
from fastkd.training.config import TrainConfig
from fastkd.training.learners import Learner, spec_text
from fastkd.training.plan import Batch, EpochPlan, EpochPlanner
from fastkd.training.report import REPORT_STEM
from fastkd.training.result import TrainResult
from fastkd.training.run import PoolResult, train, train_all
from fastkd.training.run_folder import HISTORY_FILE
from fastkd.training.state import STATE_FILE
from fastkd.training.steps import StepRecord, StepResult
from fastkd.training.strategy import (
    CrossEntropyOnly,
    JointBiKD,
    LiveTeachers,
    StoredTargets,
    TeachingStrategy,
    build_strategy,
)
from fastkd.training.summary import EpochRecord, describe_epoch
from fastkd.training.trainer import Trainer, ViewsRepeatWarning

__all__ = [
    "HISTORY_FILE",
    "REPORT_STEM",
    "STATE_FILE",
    "Batch",
    "CrossEntropyOnly",
    "EpochPlan",
    "EpochPlanner",
    "EpochRecord",
    "JointBiKD",
    "Learner",
    "LiveTeachers",
    "NonFiniteError",
    "PoolResult",
    "StepRecord",
    "StepResult",
    "StoredTargets",
    "TeachingStrategy",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "ViewsRepeatWarning",
    "build_strategy",
    "describe_epoch",
    "spec_text",
    "train",
    "train_all",
]
