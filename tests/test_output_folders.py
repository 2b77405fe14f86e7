"""No command replaces a file it did not write: output folders are new, empty or fastkd's own.

`fastkd train --out` over a folder of the user's (holding a checkpoint named as the student's
selected weights, or just notes) is refused naming the file, and nothing in it changes; a run
folder (its ``.fastkd-output`` marker) is resumed or, with ``--overwrite``, started over; a
student's checkpoint is never the file its run writes. `fastkd eval --out` and the demo claim
their folders the same way. A damaged or crafted run state is one `error:` line on --resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli_messages import assert_one_line_error, invoke
from training_pool import config, make_pool

from fastkd.demo.config import DemoConfig
from fastkd.demo.run import run_demo
from fastkd.errors import CheckpointError, ConfigError, RunExistsError
from fastkd.outputs import MARKER, claim_output_folder, owner
from fastkd.training import train


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return make_pool(tmp_path_factory.mktemp("pool"))


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _train_args(pool: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(pool.train), "--store", str(pool.store),
        "--student", pool.specs["s"], "--model", pool.specs["a"], "--model", pool.specs["b"],
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--backend", "torch",
        "--workers", "0", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def test_a_folder_with_the_users_checkpoint_is_refused_naming_it_and_left_as_it_was(pool, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "s.pt").write_bytes(b"the user's own weights")
    (user / "notes.txt").write_text("keep me")
    before = _digest(user)
    line = assert_one_line_error(invoke(_train_args(pool, user)))
    assert f"would replace {user / 's.pt'}" in line, line
    assert _digest(user) == before and sorted(os.listdir(user)) == ["notes.txt", "s.pt"]
    line = assert_one_line_error(invoke(_train_args(pool, user, "--overwrite")))
    assert "holds files fastkd did not write" in line  # --overwrite is for run folders only
    assert _digest(user) == before


def test_a_folder_of_other_files_is_refused_too(pool, tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    line = assert_one_line_error(invoke(_train_args(pool, user)))
    assert f"would write beside {user / 'notes.txt'}" in line, line
    assert sorted(os.listdir(user)) == ["notes.txt"]


def test_new_and_empty_folders_become_run_folders_that_resume_and_start_over(pool, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    train(config(pool, tmp_path, out_dir=empty))
    assert owner(empty) == "train" and (empty / "s.pt").is_file()
    with pytest.raises(RunExistsError, match="--overwrite"):
        train(config(pool, tmp_path, out_dir=empty))
    state = torch.load(empty / "state.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = train(config(pool, tmp_path, out_dir=empty, resume=True, epochs=2))
    assert [r.epoch for r in resumed.history] == [1, 2]
    over = train(config(pool, tmp_path, out_dir=empty, overwrite=True))
    assert [r.epoch for r in over.history] == [1]  # started over, not resumed
    with pytest.raises(ConfigError, match="--resume continues the run in --out, --overwrite"):
        config(pool, tmp_path, out_dir=empty, resume=True, overwrite=True)


def test_a_student_checkpoint_in_its_run_folder_is_never_overwritten(pool, tmp_path):
    run = tmp_path / "run"
    train(config(pool, tmp_path, out_dir=run))
    inside = run / "s.pt"  # the run's selected weights, now the next run's input
    before = hashlib.sha256(inside.read_bytes()).hexdigest()
    student = pool.specs["s"].split("=", 1)[0] + f"={inside}"
    with pytest.raises(ConfigError, match=rf"{inside} would replace the checkpoint of 's'"):
        train(config(pool, tmp_path, out_dir=run, student=student, overwrite=True))
    assert hashlib.sha256(inside.read_bytes()).hexdigest() == before


def test_a_run_folder_from_before_the_marker_still_resumes(pool, tmp_path):
    run = tmp_path / "old"
    train(config(pool, tmp_path, out_dir=run))
    (run / MARKER).unlink()  # as fastkd wrote run folders before the marker
    resumed = train(config(pool, tmp_path, out_dir=run, resume=True, epochs=2))
    assert [r.epoch for r in resumed.history] == [1, 2] and owner(run) == "train"


def test_a_folder_of_the_users_beside_an_old_run_is_not_taken_for_one(pool, tmp_path):
    """Only a folder holding nothing but what a run writes passes for a run from before the
    marker: ``--out runs`` where ``runs/old`` is an old run and ``runs/s.pt`` the user's."""
    runs = tmp_path / "runs"
    train(config(pool, tmp_path, out_dir=runs / "old"))
    (runs / "old" / MARKER).unlink()
    (runs / "s.pt").write_bytes(b"the user's own weights")
    with pytest.raises(ConfigError, match=f"would replace {runs / 's.pt'}"):
        train(config(pool, tmp_path, out_dir=runs))
    assert (runs / "s.pt").read_bytes() == b"the user's own weights" and owner(runs) is None


def test_overwrite_removes_what_the_run_it_replaces_wrote(pool, tmp_path):
    run = tmp_path / "run"
    train(config(pool, tmp_path, out_dir=run, epochs=2))
    (run / "report.json").write_text("{}")  # as a run with a report leaves it
    (run / "tensorboard").mkdir(exist_ok=True)
    (run / "tensorboard" / "events.out").write_text("old scalars")
    train(config(pool, tmp_path, out_dir=run, overwrite=True))
    assert not (run / "report.json").exists() and not (run / "tensorboard" / "events.out").exists()
    history = json.loads((run / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1]


def test_a_students_checkpoint_named_as_its_initial_weights_is_an_input(pool, tmp_path):
    """``--student s=OUT/s.init.pt``: the name of the file a run without a checkpoint writes,
    here the user's input, never rewritten."""
    run = tmp_path / "run"
    claim_output_folder(run, "train")  # a run folder, which the user put the file in
    inside = run / "s.init.pt"
    inside.write_bytes(Path(pool.specs["s"].split("=", 1)[1]).read_bytes())
    student = pool.specs["s"].split("=", 1)[0] + f"={inside}"
    with pytest.raises(ConfigError, match=r"s.init.pt would replace the checkpoint of 's'"):
        train(config(pool, tmp_path, out_dir=run, student=student))


def test_another_commands_folder_is_refused(pool, tmp_path):
    out = tmp_path / "eval-out"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"command": "eval"}))
    with pytest.raises(ConfigError, match="output folder of `fastkd eval`, not of `fastkd train`"):
        train(config(pool, tmp_path, out_dir=out))


def test_eval_and_demo_refuse_a_folder_of_the_users(pool, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "report.json").write_text("{}")
    args = ["eval", "--data", str(pool.train), "--model", pool.specs["a"], "--out", str(user)]
    line = assert_one_line_error(invoke(args))
    assert f"would replace {user / 'report.json'}" in line
    assert (user / "report.json").read_text() == "{}"
    with pytest.raises(ConfigError, match=f"would replace {user / 'report.json'}"):
        run_demo(DemoConfig(out_dir=user, progress=False))
    assert sorted(os.listdir(user)) == ["report.json"]


def test_eval_writes_into_its_own_folder_again(pool, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--data", str(pool.train), "--model", pool.specs["a"], "--out", str(out)]
    for _ in range(2):
        result = invoke(args)
        assert result.exit_code == 0, result.output
    assert owner(out) == "eval" and (out / "report.json").is_file()


@pytest.fixture(scope="module")
def finished(pool, tmp_path_factory) -> Path:
    """A finished one-epoch run's folder; the tests put damaged states in it, then restore it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(pool, out.parent, out_dir=out))
    return out


def _damaged_states(state: dict, good: bytes, sentinel: Path) -> dict[str, object]:
    """Replacement run states: bytes (written as they are) or payloads (torch.save'd)."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    return {
        "cut": good[: len(good) // 3],
        "empty": b"",
        "pickled": {**state, "config": RunsCode()},
        "list": [state],
        "no-learners": {k: v for k, v in state.items() if k != "learners"},
        "wrong-model": {**state, "learners": {"s": {**state["learners"]["s"], "model": {}}}},
        "bad-history": {**state, "history": [{"epoch": 1, "banana": 2}]},
        "string-loss": {**state, "history": [{**state["history"][0], "loss": "low"}]},
        "bad-mode": {
            **state,
            "config": {**state["config"], "loss": {**state["config"]["loss"], "mode": "banana"}},
        },
        "bad-old-mode": {  # as a previous version saved it: the loss's fields flat
            **state,
            "config": {**{k: v for k, v in state["config"].items() if k != "loss"}, "mode": "x"},
        },
        "bad-rng": {**state, "rng": [{"torch": "x", "numpy": None, "python": 3}]},
    }


@pytest.mark.parametrize(
    "case",
    [
        "cut",
        "empty",
        "pickled",
        "list",
        "no-learners",
        "wrong-model",
        "bad-history",
        "string-loss",
        "bad-mode",
        "bad-rng",
    ],
)
def test_a_damaged_or_crafted_run_state_is_one_line_on_resume(pool, finished, tmp_path, case):
    path = finished / "state.pt"
    good = path.read_bytes()
    sentinel = tmp_path / "code-ran"
    replacement = _damaged_states(torch.load(path, weights_only=True), good, sentinel)[case]
    try:
        if isinstance(replacement, bytes):
            path.write_bytes(replacement)
        else:
            torch.save(replacement, path)
        line = assert_one_line_error(
            invoke(_train_args(pool, finished, "--resume", "--epochs", "2"))
        )
        assert f"run state {path} cannot be" in line and "weights_only" not in line, line
        with pytest.raises(CheckpointError, match=f"run state {path} cannot be"):
            train(config(pool, finished.parent, out_dir=finished, resume=True, epochs=2))
    finally:
        path.write_bytes(good)
    assert not sentinel.exists()
