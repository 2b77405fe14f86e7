"""A run's folder: what a run writes there, and the checks before it writes anything.

``fastkd.outputs`` decides whether a folder may be written (new, empty, or fastkd's own); this
module knows a training run's files, so a refusal names the file that would be replaced, and
the run's inputs (the pool's and the students' checkpoints), which its own files must never be.
Whether the folder's state is resumed, refused or started over (``--overwrite``) is decided once,
here, before any rank writes: every rank checks, then the main one marks and clears.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.distributed

from fastkd.errors import RunExistsError
from fastkd.files import sweep_temp_files
from fastkd.models import ModelSpec
from fastkd.outputs import check_not_input, check_output_folder, claim_output_folder
from fastkd.runtime import DistContext, on_main
from fastkd.training.learners import Learner, initial_weights_path
from fastkd.training.report import CONTROL_DIR, REPORT_STEM
from fastkd.training.state import STATE_FILE
from fastkd.training.summary import SUMMARY_FILE, TENSORBOARD_DIR

HISTORY_FILE = "history.json"


def run_files(out: Path, names: Sequence[str]) -> list[str]:
    """The names a run of the trained models ``names`` writes in its folder."""
    files = [STATE_FILE, HISTORY_FILE, SUMMARY_FILE, TENSORBOARD_DIR, CONTROL_DIR]
    files += [f"{REPORT_STEM}.json", f"{REPORT_STEM}.png"]
    return files + [f"{n}.pt" for n in names] + [initial_weights_path(out, n).name for n in names]


def prepare_run_folder(
    out: Path,
    learners: Sequence[Learner],
    pool: Mapping[str, ModelSpec],
    *,
    resume: bool,
    overwrite: bool,
    dist: DistContext,
) -> bool:
    """Claim ``out`` for the run and say whether it resumes the state there. Refused: a folder
    of other files, a state without ``resume`` or ``overwrite``, a file of the run that would
    replace one of its inputs. With ``overwrite`` the old run's files are removed first, so
    nothing of it (its state above all: a kill before the first checkpoint would resume it)
    outlives the start. Every rank checks; the main one writes, and its failure stops all."""
    names = [learner.name for learner in learners]
    writes = run_files(out, names)
    check_output_folder(out, "train", writes)
    inputs = {f"the checkpoint of {name!r}": spec.checkpoint for name, spec in pool.items()}
    for learner in learners:
        if not learner.own_start:  # a checkpoint of the user's, wherever it lies
            inputs[f"the checkpoint of {learner.name!r}"] = learner.before.checkpoint
    for name in names:
        check_not_input(out / f"{name}.pt", inputs)
        check_not_input(initial_weights_path(out, name), inputs)
    state = out / STATE_FILE
    exists = state.exists()
    if exists and not resume and not overwrite:
        raise RunExistsError(
            f"{state} exists: resume that run (--resume), start it over (--overwrite) or "
            "choose another --out"
        )

    def claim() -> None:
        claim_output_folder(out, "train", writes)
        for name in (STATE_FILE, *(f"{n}.pt" for n in names)):  # a kill during a save
            sweep_temp_files(out, name)
        if exists and not resume:  # --overwrite: the run that was here is gone
            _remove_run(out, names)

    if dist.enabled:
        torch.distributed.barrier()  # every rank has looked before the folder changes
    on_main(dist, claim)
    return exists and resume


def _remove_run(out: Path, names: Sequence[str]) -> None:
    """The files of the run in ``out`` (a folder fastkd marked as a run's) that this run
    writes again; its control run is the control's to start over."""
    for name in run_files(out, names):
        path = out / name
        if name == TENSORBOARD_DIR and path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
