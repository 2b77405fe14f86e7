"""``fastkd demo``: the main job on its embedded default, end to end on real data.

Five stages, each the library code a ``fastkd`` command runs; the demo only picks the settings,
runs every arm for every seed and aggregates the reports:

1. data: scikit-learn's digits as a 32 px image folder with fixed train / val / test splits
   (``fastkd.digits``);
2. pool: three timm architectures trained from scratch with cross-entropy (``training.train``
   with ``teachers="none"``, as ``fastkd train --teachers none --from-scratch``);
3. dump: every member's outputs on ``views`` augmented views of every training image into one
   store (``dump.run_dump``, as ``fastkd dump``);
4. transfer: for each seed and arm, every member in turn learns from the others' stored targets
   for the same number of steps on the same stored views (``training.train_all``, as ``fastkd
   train --all``), selecting its weights on the val split. Arms: ``live`` (Bi-KD partition) and
   ``fixed`` (KL+DP), and the controls ``all`` (plain KD: the best teacher on every sample) and
   ``ce`` (cross-entropy fine-tuning);
5. report: ``train_all`` evaluates each arm on the test split (``metrics.transfer_from_checkpoints``,
   as ``fastkd eval --before``); the demo gives mean and spread over the seeds, compares every
   transfer arm with each control on the same (seed, member) pairs, and says from those numbers
   whether transfer helps on this data.

What a seed changes: the transfer stage only (sample order, which stored view a sample shows in
an epoch, dropout). The pool, its pretraining and the store are shared by all seeds, so the
spread is that of the transfer stage, the part the arms differ in; for the same reason the
(seed, member) pairs of a comparison are not independent, and its standard error is a yardstick,
not a significance test.

Reuse across runs: the digits folder (marked once complete); the pool and its store, in a folder
keyed by a hash of every setting that shapes them, reused or resumed through ``train``'s and
``run_dump``'s own resume (which refuse any other configuration); and each finished transfer run
(seed, arm), in a folder keyed likewise, recognised by the report ``train_all`` writes last. A
second ``fastkd demo`` with the same settings trains nothing and rewrites the report.

The package, one idea a module; each imports only the ones above it (no cycles):

- ``config``: the arms, ``DemoConfig`` (and ``DemoConfig.quick``), ``DemoLayout`` and the
  settings-hash keys of its cache folders; imports no other demo module;
- ``report``: mean and spread, ``Comparison``, ``DemoReport`` (tables, verdict, JSON / PNG / TXT);
  imports ``config``;
- ``run``: the stages, their training configurations and ``run_demo``; imports ``config`` and
  ``report``.

This module re-exports their public names and imports nothing else.
"""

from fastkd.demo.config import ARMS, ARMS_BY_NAME, IMAGE_SIZE, Arm, DemoConfig, DemoLayout
from fastkd.demo.report import REPORT_STEM, Comparison, DemoReport
from fastkd.demo.run import run_demo

__all__ = [
    "ARMS",
    "ARMS_BY_NAME",
    "IMAGE_SIZE",
    "REPORT_STEM",
    "Arm",
    "Comparison",
    "DemoConfig",
    "DemoLayout",
    "DemoReport",
    "run_demo",
]
