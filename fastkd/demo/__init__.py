"""``fastkd demo``: the main job on its embedded default, end to end on real data.

Does deciding roles per sample beat plain distillation? The demo answers on scikit-learn's digits
with k-fold cross-validation, so that every image is a test image once. Per fold, each stage is
the library code a ``fastkd`` command runs; the demo only picks the settings:

1. data: the digits as a 16 px image folder, and per fold file lists: test (the fold), val (the
   next fold, for weight selection), train (the rest) (``fastkd.digits``);
2. pool: three timm architectures trained from scratch with cross-entropy, each on its own part
   of the fold's train split (every image of six focus classes, a share of the rest) with its own
   recipe, so each is right where another is wrong (``training.train``, as ``fastkd train
   --teachers none --from-scratch``);
3. dump: every member's outputs on ``views`` augmented views of every training image into one
   store (``dump.run_dump``, as ``fastkd dump``);
4. transfer: for each arm (``config.ARMS``, each a mode of ``fastkd train``) and seed, every member
   trained on the whole train split and its stored views for the same steps (the Bi-KD-style
   arms at the demo's Adam lr, Roth et al.'s two arms with their SGD recipe)
   (``training.train_all``, as ``fastkd train --all``; joint Bi-KD: ``train`` with ``joint``);
   each run's test predictions are kept beside it;
5. report: ``analysis`` turns the predictions into the change per member and arm with paired
   bootstrap intervals over test images (and transfer seeds, when several), Roth et al.'s
   metrics and the stricter ones, each member's success against CE fine-tuning, and the
   declared questions (``config.QUESTIONS``: offline Bi-KD vs plain KD, then vs CE; Roth's
   KL+DP vs plain KL) with verdicts that say what the intervals support; ``report`` renders
   them (JSON with every prediction and the provenance, PNG, text).

Reproducible: ``runtime.reproducible`` pins the CPU code paths and torch's deterministic
algorithms before anything is computed; the same command and seed give the same numbers on any
machine of one kind (same thread count; docs/method.md says what is and is not deterministic).

Reuse across runs: the digits folder (marked once complete); each fold's pool and store, in
folders keyed by a hash of every setting that shapes them, reused or resumed through ``train``'s
and ``run_dump``'s own resume; each finished transfer run (fold, seed, arm), recognised by its
test predictions, written last. A second ``fastkd demo`` with the same settings trains nothing.

The package, one idea a module; each imports only the ones above it (no cycles):

- ``config``: the arms and questions, ``DemoConfig`` (and ``.quick``), ``DemoLayout``;
- ``predictions``: ``FoldPredictions``, a fold's test predictions as JSON;
- ``provenance``: the code (commit, source hash), versions and machine of a run; imports
  ``config``;
- ``analysis``: the report's numbers from the predictions; imports ``config``, ``predictions``;
- ``report``: ``DemoReport`` (tables, verdict, JSON / PNG / TXT, every prediction; recomputed
  from a saved report); imports ``config``, ``predictions``, ``analysis``;
- ``run``: the stages, ``run_demo`` and ``recompute_report``; imports all of the above.

This module re-exports their public names and imports nothing else.
"""

from fastkd.demo.config import (
    ARMS,
    ARMS_BY_NAME,
    IMAGE_SIZE,
    QUESTIONS,
    Arm,
    DemoConfig,
    DemoLayout,
    Question,
)
from fastkd.demo.predictions import FoldPredictions
from fastkd.demo.report import REPORT_STEM, DemoReport
from fastkd.demo.run import pretrain_pool, recompute_report, run_demo

__all__ = [
    "ARMS",
    "ARMS_BY_NAME",
    "IMAGE_SIZE",
    "QUESTIONS",
    "REPORT_STEM",
    "Arm",
    "DemoConfig",
    "DemoLayout",
    "DemoReport",
    "FoldPredictions",
    "Question",
    "pretrain_pool",
    "recompute_report",
    "run_demo",
]
