"""Nothing silent, nothing buried: every failure a user can cause ends in one line on stderr and
exit code 2; the traceback only with ``fastkd --debug``. A full disk (zarr's writes during a dump,
``torch.save`` during training, a background thread), missing network for pretrained weights,
names in square brackets and option combinations the CLI would otherwise ignore."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import threading
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import typer
import zarr
from huggingface_hub.errors import LocalEntryNotFoundError
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import fastkd.files
from fastkd.checkpoints import save_checkpoint
from fastkd.cli.guard import guarded
from fastkd.cli.main import app
from fastkd.cli.train_cmd import _print_runs
from fastkd.errors import USER_ERROR_EXIT, ConfigError, WeightsUnavailableError, find_cause
from fastkd.models import ModelSpec, load_model

NO_SPACE = os.strerror(errno.ENOSPC)
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.875,
    "crop_mode": "center",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two classes of four 16 px images and an untrained two-class timm model's checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / label / f"{i}.png")
    model = timm.create_model("test_convnext", num_classes=2)
    checkpoint = save_checkpoint(
        root / "m.pt", model, "test_convnext", {"num_classes": 2}, DATA_CONFIG
    )
    return SimpleNamespace(data=root / "data", spec=f"test_convnext={checkpoint}")


def invoke(args: list[str]) -> typer.testing.Result:
    return CliRunner().invoke(app, args, env={"COLUMNS": "400"})


LOG_LINE = re.compile(r"^(\[[^\]]*\])?\s*(INFO|WARNING)\s{2,}")  # fastkd's log (rich)


def assert_one_line_error(result: typer.testing.Result) -> str:
    """The user's error: exit code 2, no traceback, and on stderr the run's own log lines (as
    far as it got) followed by one ``error:`` line."""
    assert result.exit_code == USER_ERROR_EXIT, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    return lines[0]


def dump_args(tiny: SimpleNamespace, out: Path) -> list[str]:
    return [
        *("dump", "--data", str(tiny.data), "--model", tiny.spec, "--out", str(out)),
        *("--views", "2", "--samples-per-shard", "2", "--batch-size", "4"),
        *("--backend", "torch", "--workers", "0", "--no-progress"),
    ]


# -- a full disk ------------------------------------------------------------------------------


def test_a_dump_that_fills_the_disk_says_so_in_one_line_and_the_same_command_resumes(
    tiny, tmp_path, monkeypatch
):
    """zarr writes in its own thread; a full disk raises there an OSError without a filename
    (``write()``), re-raised by zarr's ``sync``. Here the second block's first chunk fails."""
    import zarr.storage._local as local

    put = local._put
    store = tmp_path / "store"

    def full_after_one_block(path: Path, value, exclusive: bool = False) -> int:
        key = Path(path).relative_to(store).parts
        if key[0] == "models" and "c" in key and key[key.index("c") + 1] != "0":  # block >= 1
            raise OSError(errno.ENOSPC, NO_SPACE)
        return put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", full_after_one_block)
    line = assert_one_line_error(invoke(dump_args(tiny, store)))
    assert f"no space left on device writing {store}{os.sep}models" in line
    assert "the disk is full" in line and "run the same command again to resume" in line
    assert zarr.open_group(store, mode="r")["blocks_done"][:].tolist() == [1, 0, 0, 0]

    monkeypatch.setattr(local, "_put", put)
    resumed = invoke(dump_args(tiny, store))
    assert resumed.exit_code == 0, resumed.output
    assert zarr.open_group(store, mode="r")["blocks_done"][:].tolist() == [1, 1, 1, 1]


class _FullDisk(io.FileIO):
    """An unbuffered file on a disk with ``room`` bytes left: the write that reaches the end
    writes part of its data, the next one fails, as ``write(2)`` does."""

    room = 64

    def write(self, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, NO_SPACE)
        written = super().write(memoryview(data).cast("B")[: self.room])
        self.room -= written
        return written


def test_a_train_that_fills_the_disk_says_so_in_one_line(tiny, tmp_path, monkeypatch):
    """``torch.save`` turns the OSError of a full disk into a RuntimeError ('unexpected pos'),
    keeping the OSError only as its context: the guard finds it there."""
    full_os = types.ModuleType("os")
    full_os.__dict__.update(vars(os))
    full_os.fdopen = lambda fd, *args, **kwargs: _FullDisk(fd, "wb")
    monkeypatch.setattr(fastkd.files, "os", full_os)
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny.data), "--student", tiny.spec, "--teachers", "none"]
    args += ["--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--out", str(out)]
    args += ["--backend", "torch", "--no-progress"]
    raised = invoke(["--debug", *args]).exception
    assert isinstance(raised, RuntimeError) and "unexpected pos" in str(raised)
    assert isinstance(raised.__context__, OSError)
    line = assert_one_line_error(invoke(args))
    assert f"no space left on device writing {out}{os.sep}" in line
    assert "the disk is full" in line and "with --resume" in line


def _guarded_app(command) -> typer.Typer:
    """A one-command app under the guard, with the root --debug option as fastkd has it."""
    one = typer.Typer()

    @one.callback()
    def _root(debug: bool = typer.Option(False, "--debug")) -> None:
        pass

    one.command("work")(guarded(command))
    return one


def _thread_fails_with_a_full_disk() -> None:
    def beat() -> None:
        raise OSError(errno.ENOSPC, NO_SPACE, "/store/.fastkd/claims/x.json")

    thread = threading.Thread(target=beat, name="fastkd-claim")
    thread.start()
    thread.join()


def test_a_background_thread_on_a_full_disk_prints_no_traceback():
    """The store's claim heartbeat is a thread: its error would be printed by threading's hook
    as a traceback beside the main thread's own message."""

    def work(out: Path = Path("somewhere")) -> None:
        _thread_fails_with_a_full_disk()
        raise OSError(errno.ENOSPC, NO_SPACE)  # the main thread's write, no filename

    result = CliRunner().invoke(_guarded_app(work), ["work"])
    line = assert_one_line_error(result)
    assert "no space left on device writing somewhere: the disk is full" in line

    def finishes() -> None:
        _thread_fails_with_a_full_disk()

    result = CliRunner().invoke(_guarded_app(finishes), ["work"])
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert result.stderr.strip() == (
        "warning: a background thread stopped: "
        f"[Errno {errno.ENOSPC}] {NO_SPACE}: '/store/.fastkd/claims/x.json'"
    )


# -- --debug, and bugs -----------------------------------------------------------------------


def test_debug_is_a_documented_global_option_that_shows_the_traceback(tmp_path):
    assert "--debug" in invoke(["--help"]).output
    missing = ["inspect", str(tmp_path / "nothing")]
    assert "is not a fastkd store" in assert_one_line_error(invoke(missing))
    debug = invoke(["--debug", *missing])
    assert debug.exit_code == 1 and "is not a fastkd store" in str(debug.exception)
    assert debug.exc_info is not None and debug.exc_info[2] is not None  # the traceback


def test_a_bug_keeps_its_traceback():
    def broken() -> None:
        {}["missing"]

    result = CliRunner().invoke(_guarded_app(broken), ["work"])
    assert isinstance(result.exception, KeyError)


def test_find_cause_looks_through_chains_and_groups_but_not_suppressed_context():
    disk = OSError(errno.ENOSPC, NO_SPACE)
    try:
        try:
            raise disk
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598") from None
    except RuntimeError as suppressed:
        assert find_cause(suppressed, OSError) is None
    wrapped = RuntimeError("unexpected pos 704 vs 598")
    wrapped.__context__ = disk
    assert find_cause(wrapped, OSError) is disk
    group_type = getattr(builtins, "ExceptionGroup", None)  # Python >= 3.11
    if group_type is not None:
        group = group_type("tasks", [ValueError("other"), wrapped])
        assert find_cause(group, OSError) is disk
        assert find_cause(group, (ConfigError,)) is None


# -- pretrained weights without network ------------------------------------------------------


def _offline(*args, **kwargs):
    """What huggingface_hub raises without network (and without the file in its cache)."""
    raise LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub and we cannot find the "
        "requested files in the local cache. Please check your connection and try again."
    ) from ConnectionError("[Errno -2] Name or service not known")


def test_pretrained_weights_without_network_are_one_line_naming_the_model(
    tiny, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", _offline)
    with pytest.raises(WeightsUnavailableError) as error:
        load_model(ModelSpec.parse("resnet18"))
    assert isinstance(error.value, RuntimeError)  # what load_model raised before
    args = ["dump", "--data", str(tiny.data), "--model", "[effnet]:resnet18"]
    line = assert_one_line_error(invoke([*args, "--out", str(tmp_path / "store")]))
    assert (
        "model '[effnet]': timm's pretrained weights for 'resnet18' could not be downloaded" in line
    )
    assert "ConnectionError: [Errno -2] Name or service not known" in line
    assert "give a local weights file instead, resnet18=CKPT" in line
    assert "HF_HOME" in line


def test_a_full_disk_while_downloading_weights_stays_a_disk_error(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE, "/cache/models--timm--resnet18/blob.incomplete")

    from fastkd import models
    from fastkd.pretrained import HubAccess

    monkeypatch.setattr(models, "hub_access", lambda arch: HubAccess(offline=False))  # a hub
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", full)
    with pytest.raises(OSError) as error:
        load_model(ModelSpec.parse("resnet18"))
    assert error.value.errno == errno.ENOSPC
    assert not isinstance(error.value, WeightsUnavailableError)


# -- square brackets, ignored options ---------------------------------------------------------


def test_names_in_square_brackets_are_printed_as_given(tiny, tmp_path):
    """rich reads ``[effnet]`` as markup and drops it, unless the text is escaped or a Text."""
    missing = tmp_path / "[effnet].pt"
    for spec, message in (
        ("[effnet]:x", "model '[effnet]': 'x' is not a timm model name"),
        (f"test_convnext={missing}", f"checkpoint {missing} does not exist"),
    ):
        args = ["dump", "--data", str(tiny.data), "--model", spec]
        line = assert_one_line_error(invoke([*args, "--out", str(tmp_path / "store")]))
        assert message in line
    console = Console(record=True, width=400, file=io.StringIO())
    run = SimpleNamespace(checkpoints={"[effnet]": tmp_path / "[effnet].pt"})
    _print_runs(console, {"[effnet]": run})
    assert console.export_text().strip() == f"[effnet]: selected weights {tmp_path}/[effnet].pt"


def test_views_with_a_store_is_refused_naming_both_flags(tiny, tmp_path):
    args = ["train", "--data", str(tiny.data), "--store", str(tmp_path / "store")]
    args += ["--student", tiny.spec, "--out", str(tmp_path / "run")]
    line = assert_one_line_error(invoke([*args, "--views", "1"]))
    assert "--views 1 with --store: a store has the views it was dumped with" in line
    both = assert_one_line_error(invoke([*args, "--views", "2", "--hflip", "0"]))
    assert "leave out the view augmentation options with a store" in both  # every problem
    assert "--views 2 with --store" in both
    assert not (tmp_path / "run").exists()
