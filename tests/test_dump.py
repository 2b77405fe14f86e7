"""``fastkd dump`` end to end on the digits with real timm models: the store read back by plain
zarr against direct torch inference, DALI against torch, kill-and-resume and parts bit for bit,
bad input refused without losing what was written, and the writer thread's failures and the
dump's own stopping it cleanly."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import timm
import torch
import zarr
from file_edits import same_size_other_png
from reference_views import reference_inputs
from typer.testing import CliRunner

from fastkd.checkpoints import save_checkpoint
from fastkd.cli.main import app
from fastkd.dump import DumpConfig, run_dump
from fastkd.dump.block_writer import THREAD_NAME
from fastkd.errors import BadImageError, StoreError
from fastkd.store import StoreWriter, check_store

if TYPE_CHECKING:
    from digits_pool import PoolMember

pytest_plugins = ("digits_pool",)

SAMPLES_PER_SHARD = 8  # 60 digits -> 8 blocks, the last one short
LOGIT_ATOL = 0.25  # DALI vs torch images (tolerance stated and measured in test_data.py)
TOP1_AGREEMENT = 0.95


def dump_args(data: Path, pool: list[PoolMember], out: Path, *extra: str) -> list[str]:
    models = [arg for member in pool for arg in ("--model", member.spec)]
    return [
        "dump",
        "--data", str(data),
        *models,
        "--out", str(out),
        "--views", "2",
        "--seed", "3",
        "--batch-size", "8",
        "--samples-per-shard", str(SAMPLES_PER_SHARD),
        "--workers", "1",
        *extra,
    ]  # fmt: skip


def run_cli(args: list[str], expect_code: int = 0) -> str:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # no line wrapping
    trace = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert result.exit_code == expect_code, result.output + trace
    return result.output


def plain_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, read by zarr alone."""
    group = zarr.open_group(path, mode="r")
    with warnings.catch_warnings():  # zarr notes that .fastkd/ (locks, claims) is not zarr
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        members = list(group.members(max_depth=None))
    return {name: node[:] for name, node in members if isinstance(node, zarr.Array)}


def blocks_done(path: Path) -> np.ndarray:
    return zarr.open_group(path, mode="r")["blocks_done"][:]


def assert_same_store(a: Path, b: Path) -> None:
    arrays_a, arrays_b = plain_arrays(a), plain_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name, values in arrays_a.items():
        np.testing.assert_array_equal(values, arrays_b[name], err_msg=name, strict=True)
    group_a, group_b = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert group_a.attrs.asdict() == group_b.attrs.asdict()


@pytest.fixture(scope="module")
def torch_store(digits_small: Path, digit_pool: list[PoolMember], tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dump") / "torch.zarr"
    run_cli(dump_args(digits_small, digit_pool, out, "--backend", "torch"))
    return out


@pytest.fixture(scope="module")
def dali_store(digits_small: Path, digit_pool: list[PoolMember], tmp_path_factory) -> Path:
    pytest.importorskip("nvidia.dali")
    out = tmp_path_factory.mktemp("dump") / "dali.zarr"
    run_cli(dump_args(digits_small, digit_pool, out, "--backend", "dali"))
    return out


def _reference_model(member: PoolMember) -> torch.nn.Module:
    """The checkpoint's model rebuilt with timm and torch alone."""
    payload = torch.load(member.checkpoint, weights_only=True)
    model = timm.create_model(member.arch, **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def test_store_matches_direct_torch_inference(
    torch_store: Path, digits_small: Path, digit_pool: list[PoolMember]
) -> None:
    group = zarr.open_group(torch_store, mode="r")
    manifest, status = group.attrs["fastkd"], group.attrs["fastkd_status"]
    assert status == {"complete": True, "skipped": []}
    assert manifest["views"] == 2 and manifest["seed"] == 3 and manifest["num_classes"] == 10
    keys = group["keys"][:].tolist()
    files = sorted(p.relative_to(digits_small).as_posix() for p in digits_small.rglob("*.png"))
    assert keys == files  # class folders in order, files sorted within each
    labels = group["labels"][:]
    np.testing.assert_array_equal(labels, [int(Path(k).parent.name) for k in keys])
    boxes, flips = group["boxes"][:], group["flips"][:]
    assert flips[:, 0].sum() == 0 and 0 < flips[:, 1].sum() < len(keys)  # view 0: the eval view

    for member, entry in zip(digit_pool, manifest["models"], strict=True):
        assert entry["name"] == member.name and entry["topk"] == 0  # 10 classes: dense
        assert (
            entry["checkpoint_sha256"] == hashlib.sha256(member.checkpoint.read_bytes()).hexdigest()
        )
        assert entry["data_config"] == member.data_config
        model = _reference_model(member)
        inputs = torch.stack(
            [
                reference_inputs(
                    digits_small / keys[s], tuple(boxes[s, v]), flips[s, v], member.data_config
                )
                for s in range(len(keys))
                for v in range(2)
            ]
        )
        with torch.inference_mode():
            logits = model(inputs).double().view(len(keys), 2, 10)
        logprobs = logits.log_softmax(-1)
        stored = group[f"models/{member.name}/logprobs"][:]
        assert stored.dtype == np.float16
        torch.testing.assert_close(
            torch.from_numpy(stored).double(), logprobs, atol=2e-3, rtol=1e-3
        )
        true_logprob = torch.from_numpy(group[f"models/{member.name}/true_logprob"][:]).double()
        expected = logprobs.gather(-1, torch.from_numpy(labels).view(-1, 1, 1).expand(-1, 2, 1))
        torch.testing.assert_close(true_logprob, expected.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_dali_and_torch_dumps_agree(torch_store: Path, dali_store: Path) -> None:
    a, b = plain_arrays(torch_store), plain_arrays(dali_store)
    for name in ("keys", "labels", "sizes", "boxes", "flips", "skipped"):
        np.testing.assert_array_equal(a[name], b[name])
    for name in [n for n in a if n.endswith("/logprobs")]:
        x, y = torch.from_numpy(a[name]).float(), torch.from_numpy(b[name]).float()
        torch.testing.assert_close(x, y, atol=LOGIT_ATOL, rtol=0)
        assert (x.argmax(-1) == y.argmax(-1)).float().mean() >= TOP1_AGREEMENT


def _done_blocks_files(store: Path, done: np.ndarray) -> dict[str, int]:
    """mtime of every shard file of the finished blocks (block b is shard c/b/...)."""
    return {
        str(p): p.stat().st_mtime_ns
        for block in np.flatnonzero(done)
        for p in (store / "models").glob(f"*/*/c/{block}/**/*")
        if p.is_file()
    }


def test_killed_dump_resumes_bit_identical_and_refuses_a_second_writer(
    digits_small: Path, digit_pool: list[PoolMember], dali_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "fastkd.cli.main", *dump_args(digits_small, digit_pool, out)]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if blocks_done(out).sum() >= 1:
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass  # not created yet
            time.sleep(0.01)
        child.send_signal(signal.SIGSTOP)  # alive, holding its claim: a second writer must wait
        assert child.poll() is None, (
            f"the dump ended before it could be stopped: {child.stderr.read()}"
        )
        done = blocks_done(out)
        assert 0 < done.sum() < len(done)

        refused = run_cli(dump_args(digits_small, digit_pool, out), expect_code=2)
        assert "overlaps the live claim" in refused and f"pid {child.pid}" in refused
    finally:
        child.kill()  # SIGKILL: no cleanup; its claim stays behind, its pid is gone
        child.wait(timeout=30)

    done = blocks_done(out)
    assert 0 < done.sum() < len(done)
    finished_files = _done_blocks_files(out, done)
    run_cli(dump_args(digits_small, digit_pool, out))
    assert _done_blocks_files(out, done) == finished_files  # blocks already done were not rewritten
    assert_same_store(out, dali_store)  # backend auto = DALI here


def test_parts_fill_one_store(
    digits_small: Path, digit_pool: list[PoolMember], dali_store: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "parts.zarr"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run_cli(dump_args(digits_small, digit_pool, out))  # rank 1 of 2, from torchrun's variables
    assert blocks_done(out).tolist() == [0, 1] * 4
    run_cli(dump_args(digits_small, digit_pool, out, "--part", "0/2"))  # the flag wins
    assert_same_store(out, dali_store)


def test_changed_data_set_is_refused_until_overwrite(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    data = Path(shutil.copytree(digits_small, tmp_path / "data"))
    out = tmp_path / "store.zarr"
    pool = digit_pool[:1]
    run_cli(dump_args(data, pool, out, "--views", "1"))
    before = plain_arrays(out)
    shutil.copy(next((data / "4").glob("*.png")), data / "4" / "extra.png")

    refused = run_cli(dump_args(data, pool, out, "--views", "1"), expect_code=2)
    assert (
        "fingerprint: store has" in refused and "num_samples: store has 60, expected 61" in refused
    )
    after = plain_arrays(out)
    assert all(np.array_equal(before[name], after[name]) for name in before)  # nothing lost

    run_cli(dump_args(data, pool, out, "--views", "1", "--overwrite"))
    assert zarr.open_group(out, mode="r")["labels"].shape == (61,)


def test_class_count_mismatch_is_refused(digits_small: Path, tmp_path: Path) -> None:
    model = timm.create_model("test_efficientnet", num_classes=7)
    checkpoint = save_checkpoint(
        tmp_path / "seven.pt", model, "test_efficientnet", {"num_classes": 7}, {}
    )
    out = tmp_path / "store.zarr"
    args = [
        "dump",
        "--data",
        str(digits_small),
        "--model",
        f"test_efficientnet={checkpoint}",
        "--out",
        str(out),
    ]
    refused = run_cli(args, expect_code=2)
    assert "model 'seven' (test_efficientnet) predicts 7 classes" in refused
    assert f"data set {digits_small} has 10" in refused
    assert not out.exists()


def test_bad_images_fail_keeping_written_blocks_or_are_skipped(
    digits_small: Path, digit_pool: list[PoolMember], torch_store: Path, tmp_path: Path
) -> None:
    data = Path(shutil.copytree(digits_small, tmp_path / "data"))
    keys = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    truncated = 29  # in block 3 (8 samples per block)
    path = data / keys[truncated]
    path.write_bytes(path.read_bytes()[:80])  # its header still reads; its pixels do not
    out = tmp_path / "store.zarr"
    args = dump_args(data, digit_pool, out, "--backend", "torch")

    failed = run_cli(args, expect_code=2)
    assert f"{path.name} (sample {truncated})" in failed
    assert blocks_done(out).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # written before the bad block

    run_cli([*args, "--on-bad-image", "skip"])  # resumes at block 3 and skips the image
    group, clean = zarr.open_group(out, mode="r"), zarr.open_group(torch_store, mode="r")
    assert np.flatnonzero(group["skipped"][:]).tolist() == [truncated]
    assert group.attrs["fastkd_status"] == {"complete": True, "skipped": [keys[truncated]]}
    keep = np.arange(len(keys)) != truncated
    for member in digit_pool:
        stored = group[f"models/{member.name}/logprobs"][:]
        np.testing.assert_allclose(
            stored[keep], clean[f"models/{member.name}/logprobs"][:][keep], atol=1e-3
        )
        assert not stored[truncated].any()  # no targets for it

    garbage = data / "0" / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    new_out = tmp_path / "other.zarr"
    failed = run_cli(dump_args(data, digit_pool, new_out), expect_code=2)
    assert "garbage.png" in failed and not new_out.exists()  # found before anything is written


def test_bad_arguments_are_named(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    assert "--part must look like i/n" in run_cli(  # --shard: the old name of --part
        dump_args(digits_small, digit_pool, out, "--shard", "two"), expect_code=2
    )
    assert "does not exist" in run_cli(dump_args(tmp_path / "nope", digit_pool, out), expect_code=2)
    missing = run_cli(
        [
            "dump",
            "--data",
            str(digits_small),
            "--model",
            f"test_vit={tmp_path}/no.pt",
            "--out",
            str(out),
        ],
        expect_code=2,
    )
    assert "no.pt does not exist" in missing
    assert not out.exists()


def test_augmentation_options_reach_the_manifest_and_the_views(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    out = tmp_path / "aug.zarr"
    options = ["--crop-scale", "0.5", "1", "--hflip", "0", "--eval-crop-pct", "1", "--views", "4"]
    run_cli(dump_args(digits_small, digit_pool[:1], out, "--backend", "torch", *options))
    group = zarr.open_group(out, mode="r")
    augment = group.attrs["fastkd"]["augment"]
    assert augment["scale"] == [0.5, 1.0] and augment["hflip"] == 0.0
    assert augment["eval_crop_pct"] == 1.0 and augment["eval_view"] is True
    boxes, sizes = group["boxes"][:].astype(np.int64), group["sizes"][:]
    assert not group["flips"][:].any()  # --hflip 0: no view is flipped
    # View 0 is the whole (square) image; every view covers about half of it or more (pixel
    # rounding of a 32 px side takes off a little; the default --crop-scale gives 0.09 here).
    np.testing.assert_array_equal(boxes[:, 0, 2:], sizes)
    area = boxes[..., 2] * boxes[..., 3] / (sizes[:, None, 0] * sizes[:, None, 1])
    assert area.min() >= 0.45 and area[:, 1:].max() <= 1.0
    assert "--crop-scale" in run_cli(
        dump_args(
            digits_small, digit_pool[:1], tmp_path / "bad.zarr", "--crop-scale", "0.9", "0.2"
        ),
        expect_code=2,
    )
    assert not (tmp_path / "bad.zarr").exists()


def test_cli_help_explains_every_option() -> None:
    text = run_cli(["dump", "--help"])
    for option in ("--data", "--model", "--out", "--views", "--topk", "--seed", "--batch-size",
                   "--backend", "--device", "--part", "--shard", "--overwrite", "--on-bad-image",
                   "--crop-scale", "--crop-ratio", "--hflip", "--eval-crop-pct",
                   "--write-queue"):  # fmt: skip
        assert option in text
    assert "torchrun's RANK/WORLD_SIZE" in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"topk": 0, "tail": "bucket"}, "--tail bucket describes the classes outside a top-k"),
        ({"tail_samples": 4}, r"--tail-samples 4 is for --tail sampled, got --tail \(default"),
        ({"tail": "uniform", "tail_samples": 4}, "got --tail uniform"),
        ({"tail": "wide"}, "unknown tail model 'wide'"),
        ({"tail": "sampled", "tail_samples": 65}, r"--tail-samples must be in \[1, 64\], got 65"),
    ],
)
def test_target_options_that_would_be_ignored_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DumpConfig(data=Path("d"), models=["m"], out=Path("o"), **options)
    assert DumpConfig(data=Path("d"), models=["m"], out=Path("o"), tail="sampled", tail_samples=4)


def test_damaged_blocks_are_listed_and_repaired_exactly(
    torch_store: Path, digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    """The issue's silent failures: a deleted teacher shard and flipped bytes leave `inspect`
    saying complete; now `inspect --verify` names them, and `dump --repair` rewrites exactly
    those blocks (every other shard file untouched) to the same bytes as before."""
    from fastkd.store.integrity import shard_file

    store = tmp_path / "store.zarr"
    shutil.copytree(torch_store, store)
    group = zarr.open_group(store, mode="r")
    member = sorted(group["models"].group_keys())[0]
    deleted = Path(shard_file(store, group[f"models/{member}/true_logprob"], 2))
    flipped = Path(shard_file(store, group["boxes"], 5))
    deleted.unlink()
    raw = bytearray(flipped.read_bytes())
    raw[8:24] = bytes(b ^ 0x5A for b in raw[8:24])
    flipped.write_bytes(bytes(raw))
    files = {p: p.stat().st_mtime_ns for p in store.rglob("c/*/*") if p.is_file()}

    out = run_cli(["inspect", str(store), "--verify", "--no-progress"], expect_code=2)
    assert f"models/{member}/true_logprob, block 2 (samples 16-23), file {deleted}: missing" in out
    assert f"boxes, block 5 (samples 40-47), file {flipped}" in out
    assert "2 damaged block(s)" in out and "--repair" in out

    time.sleep(0.01)  # a rewritten file gets a later mtime
    run_cli(dump_args(digits_small, digit_pool, store, "--backend", "torch", "--repair"))
    assert_same_store(store, torch_store)
    rewritten = {p for p, mtime in files.items() if p.stat().st_mtime_ns != mtime}
    assert rewritten and all(p.parts[-3:-1] in {("c", "2"), ("c", "5")} for p in rewritten)
    assert "verified" in run_cli(["inspect", str(store), "--verify", "--no-progress"])


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_the_store_records_each_file_content_hash_as_read(
    backend: str, request: pytest.FixtureRequest, digits_small: Path
) -> None:
    """Both loaders hash the bytes they decode: the store's file_hashes are xxh3-64 of each
    file, computed here by xxhash directly from the files."""
    import xxhash

    arrays = plain_arrays(request.getfixturevalue(f"{backend}_store"))
    expected = [
        np.uint64(xxhash.xxh3_64_intdigest((digits_small / key).read_bytes())).view(np.int64)
        for key in arrays["keys"]
    ]
    np.testing.assert_array_equal(arrays["file_hashes"], np.array(expected))


def test_repair_by_part_restores_labels_lost_hashes_and_changed_files(
    torch_store: Path, digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    """--repair --part i/n rewrites only its part's bad blocks: a damaged labels shard (block 1),
    a lost hash row (block 4, named by its own file) and, in part 0, a block made from an image
    changed since the dump (block 6)."""
    import xxhash

    from fastkd.store.integrity import shard_file

    data = tmp_path / "data"
    shutil.copytree(digits_small, data)
    store = tmp_path / "store.zarr"
    shutil.copytree(torch_store, store)
    group = zarr.open_group(store, mode="r")
    labels = Path(shard_file(store, group["labels"], 1))
    labels.write_bytes(labels.read_bytes()[:-9])  # truncated
    hashes = Path(shard_file(store, group["block_hashes"], 4))
    hashes.unlink()
    key = str(group["keys"][50])  # block 6 (samples 48-55)
    changed = data / key
    changed.write_bytes(same_size_other_png(changed))  # the fingerprint cannot see it

    out = run_cli(["inspect", str(store), "--verify", "--no-progress"], expect_code=2)
    assert f"labels, block 1 (samples 8-15), file {labels}: cannot be decoded" in out
    assert (
        f"block_hashes, block 4 (samples 32-39), file {hashes}: the block's hashes are lost" in out
    )

    run_cli(dump_args(data, digit_pool, store, "--backend", "torch", "--repair", "--part", "0/2"))
    bad = run_cli(["inspect", str(store), "--verify", "--no-progress"], expect_code=2)
    assert "labels, block 1" in bad and "block_hashes" not in bad  # part 1's is left for part 1
    stored = zarr.open_group(store, mode="r")["file_hashes"][50]
    assert stored == np.uint64(xxhash.xxh3_64_intdigest(changed.read_bytes())).view(np.int64)
    run_cli(dump_args(data, digit_pool, store, "--backend", "torch", "--repair", "--part", "1/2"))
    assert "verified" in run_cli(["inspect", str(store), "--verify", "--no-progress"])
    restored, original = plain_arrays(store), plain_arrays(torch_store)
    for name in ("labels", "keys", "sizes", "boxes", "flips", "blocks_done"):
        np.testing.assert_array_equal(restored[name], original[name], err_msg=name)
    np.testing.assert_array_equal(restored["block_hashes"][:6], original["block_hashes"][:6])


def test_a_file_whose_views_read_different_bytes_is_refused(
    torch_store: Path, digits_small: Path
) -> None:
    """Views of one sample in one batch must have read the same bytes (the last read no longer
    silently wins)."""
    from fastkd.data import ViewBatch, open_dataset
    from fastkd.dump.run import _BlockBuffer
    from fastkd.errors import DatasetError

    class Writer:
        def block_range(self, block: int) -> tuple[int, int]:
            return 0, 8

    buffer = _BlockBuffer(Writer(), 0, [], 2, torch.device("cpu"), open_dataset(digits_small))
    batch = ViewBatch(
        samples=torch.tensor([3, 3]), views=torch.tensor([0, 1]), labels=torch.tensor([0, 0]),
        images=[], file_hashes=np.array([11, 12]),
    )  # fmt: skip
    with pytest.raises(DatasetError, match=r"sample 3\) changed while the dump read it"):
        buffer.add(batch, [])


# -- the writer thread ---------------------------------------------------------------------------


def dump_config(data: Path, pool: list[PoolMember], out: Path, **options) -> DumpConfig:
    """``dump_args`` with the torch backend, as a ``DumpConfig`` (the same store as the CLI's)."""
    settings = {"views": 2, "seed": 3, "batch_size": 8, "samples_per_shard": SAMPLES_PER_SHARD,
                "num_workers": 1, "backend": "torch", "progress": False}  # fmt: skip
    return DumpConfig(data=data, models=[m.spec for m in pool], out=out, **{**settings, **options})


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (rather than hang) when the body takes longer: a dump waiting on a dead writer."""

    def expired(*_) -> None:
        raise TimeoutError(f"still running after {seconds} s: the dump hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture
def cut_image_data(digits_small: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the digits whose sample 29 (block 3) has a readable header and no pixels."""
    data = Path(shutil.copytree(digits_small, tmp_path / "data"))
    keys = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    path = data / keys[29]
    path.write_bytes(path.read_bytes()[:80])
    return data, 29


def assert_done_blocks_are_whole(out: Path, clean: Path) -> np.ndarray:
    """The blocks marked done verify, and hold exactly the rows of an uninterrupted dump."""
    assert check_store(out, progress=False) == []
    done, arrays, reference = blocks_done(out), plain_arrays(out), plain_arrays(clean)
    for block in np.flatnonzero(done):
        rows = slice(block * SAMPLES_PER_SHARD, (block + 1) * SAMPLES_PER_SHARD)
        for name in arrays:
            if name not in ("blocks_done", "block_hashes"):
                np.testing.assert_array_equal(arrays[name][rows], reference[name][rows], name)
    return done


def test_overlapped_writes_give_the_store_of_synchronous_ones(
    digits_small: Path, digit_pool: list[PoolMember], torch_store: Path, tmp_path: Path
) -> None:
    """torch_store was written by the writer thread (the default queue of 2); --write-queue 0
    writes each block in the dump's own thread: the same arrays, bit for bit, and manifest."""
    out = tmp_path / "sync.zarr"
    run_cli(dump_args(digits_small, digit_pool, out, "--backend", "torch", "--write-queue", "0"))
    assert_same_store(out, torch_store)


def test_a_failed_write_stops_the_dump_with_its_own_error_and_resumes(
    digits_small: Path, digit_pool: list[PoolMember], torch_store: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Block 1's write fails in the writer thread once the dump has filled the queue (blocks
    2-3) and waits to queue block 4: that very error comes out of run_dump at once, block 1
    stays pending, and a resume finishes the store as an uninterrupted dump would have."""
    write_block, error, threads = StoreWriter.write_block, StoreError("block 1: disk gone"), []
    failed_at: list[float] = []
    batches_at: list[float] = []

    def fail_on_block_1(self, block: int, *args, **kwargs) -> None:
        threads.append(threading.current_thread().name)
        if block != 1:
            return write_block(self, block, *args, **kwargs)
        waited = time.monotonic()
        while len(batches_at) < 10 and time.monotonic() < waited + 10:  # blocks 0-4 inferred
            time.sleep(0.01)
        time.sleep(0.1)  # the dump is now waiting for room in the queue
        failed_at.append(time.monotonic())
        raise error

    monkeypatch.setattr(StoreWriter, "write_block", fail_on_block_1)
    out = tmp_path / "store.zarr"
    with deadline(60), pytest.raises(StoreError) as raised:
        run_dump(dump_config(digits_small, digit_pool, out), on_batch=lambda n: batches_at.append(
            time.monotonic()))  # fmt: skip
    stopped = time.monotonic()
    assert raised.value is error  # itself, not wrapped
    assert threads == [THREAD_NAME, THREAD_NAME] and not writer_threads()
    assert stopped - failed_at[0] < 5  # no hang on the full queue (it polls every 50 ms)
    assert sum(t > failed_at[0] for t in batches_at) <= 2  # at most the batch in flight
    assert blocks_done(out).tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # nothing after the failure

    monkeypatch.setattr(StoreWriter, "write_block", write_block)
    run_dump(dump_config(digits_small, digit_pool, out))
    assert_same_store(out, torch_store)


def _interrupt_on_block(
    block: int, failed_at: list[float], failed: threading.Event, monkeypatch
) -> None:
    """The first pool member raises KeyboardInterrupt on the first batch of ``block``."""
    import fastkd.dump.run as run

    load_model, forwards = run.load_model, []

    def interrupting(*args, **kwargs):
        member = load_model(*args, **kwargs)
        if not forwards:
            forwards.append(0)

            def hook(module, inputs) -> None:
                forwards[0] += 1
                if forwards[0] > 2 * block:  # two batches a block (8 samples x 2 views / 8)
                    failed_at.append(time.monotonic())
                    failed.set()
                    raise KeyboardInterrupt

            member.model.register_forward_pre_hook(hook)
        return member

    monkeypatch.setattr(run, "load_model", interrupting)


def _record_failure(failed_at: list[float], failed: threading.Event, monkeypatch) -> None:
    """Record when the view loader raises (a bad image)."""
    import fastkd.dump.run as run

    view_loader = run.view_loader

    def recording(*args, **kwargs):
        try:
            yield from view_loader(*args, **kwargs)
        except Exception:
            failed_at.append(time.monotonic())
            failed.set()
            raise

    monkeypatch.setattr(run, "view_loader", recording)


@pytest.mark.parametrize("failure", ["bad image", "interrupt"])
def test_a_failing_dump_joins_its_writer_and_marks_only_whole_blocks(
    failure: str, cut_image_data: tuple[Path, int], digits_small: Path,
    digit_pool: list[PoolMember], torch_store: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Blocks are queued and one is half written when the dump fails in its own thread (the
    second model's encoding of block 1 waits for the failure): on a bad image in block 3 the
    queued blocks 1-2 are still written; on Ctrl-C (a model interrupted in block 4) block 1 is
    finished and the queued ones (2-3) dropped. Either way the thread is joined after that
    write, and every block marked done is whole."""
    import fastkd.store.writer as writer_module

    encode, write_block = writer_module.encode_logits, StoreWriter.write_block
    threads, ends, failed = set(), [], threading.Event()
    failed_at: list[float] = []

    def held_encode(*args, **kwargs):
        if kwargs["first_sample"] == SAMPLES_PER_SHARD and kwargs["model_index"] == 1:
            failed.wait(10)  # the first model's arrays of block 1 are written by now
        return encode(*args, **kwargs)

    def recording(self, *args, **kwargs) -> None:
        threads.add(threading.current_thread().name)
        write_block(self, *args, **kwargs)
        ends.append(time.monotonic())

    monkeypatch.setattr(writer_module, "encode_logits", held_encode)
    monkeypatch.setattr(StoreWriter, "write_block", recording)
    out = tmp_path / "store.zarr"
    if failure == "bad image":
        data, sample = cut_image_data
        _record_failure(failed_at, failed, monkeypatch)
        with deadline(60), pytest.raises(BadImageError, match=f"sample {sample}"):
            run_dump(dump_config(data, digit_pool, out))
    else:
        _interrupt_on_block(4, failed_at, failed, monkeypatch)
        with deadline(60), pytest.raises(KeyboardInterrupt):
            run_dump(dump_config(digits_small, digit_pool, out))
    assert threads == {THREAD_NAME} and not writer_threads()  # written there, and joined
    assert len(failed_at) == 1 and max(ends) > failed_at[0]  # the dump waited for it
    done = assert_done_blocks_are_whole(out, torch_store).tolist()
    written = 3 if failure == "bad image" else 2  # blocks 0-2: every one before the bad image
    assert done == [1] * written + [0] * (8 - written)


def test_on_batch_counts_every_view_inferred(
    cut_image_data: tuple[Path, int], digit_pool: list[PoolMember], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The hook runs in the dump's thread once a batch, with the batch's (sample, view) items:
    they add up to the views the store holds targets for (every view of each sample not
    skipped); the blocks are written by the writer thread."""
    data, sample = cut_image_data
    write_block, writers, calls = StoreWriter.write_block, set(), []

    def recording(self, *args, **kwargs) -> None:
        writers.add(threading.current_thread().name)
        return write_block(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_block", recording)
    out = tmp_path / "store.zarr"
    run_dump(
        dump_config(data, digit_pool, out, on_bad_image="skip"),
        on_batch=lambda n: calls.append((n, threading.current_thread().name)),
    )
    group = zarr.open_group(out, mode="r")
    skipped = group["skipped"][:]
    assert np.flatnonzero(skipped).tolist() == [sample]
    counts = [n for n, _ in calls]
    assert sum(counts) == (~skipped).sum() * 2 == 118  # 59 samples x 2 views
    assert len(counts) == 15 and sorted(set(counts)) == [6, 8]  # the cut image's batch: 6
    assert {name for _, name in calls} == {threading.current_thread().name}
    assert writers == {THREAD_NAME}


def test_a_negative_write_queue_is_one_line_naming_the_option(
    digits_small: Path, digit_pool: list[PoolMember], tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    result = CliRunner().invoke(
        app, dump_args(digits_small, digit_pool, out, "--write-queue", "-1"), env={"COLUMNS": "400"}
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "error: --write-queue must be >= 0 (blocks waiting to be written while the next are "
        "inferred; 0 writes each block before the next), got -1"
    ]
    assert not out.exists()


@pytest.mark.parametrize("when", ["after an interrupt", "at the end"])
def test_an_interrupt_while_the_stop_is_queued_still_joins_the_writer(monkeypatch, when) -> None:
    """Ctrl-C while the stop waits on a full queue, after a first Ctrl-C or at the dump's normal
    end: what is queued is dropped, the write in progress finishes, and the thread ends and is
    joined (the store is never closed under a live writer)."""
    from fastkd.dump import block_writer
    from fastkd.dump.block_writer import BackgroundWrites

    written, release = [], threading.Event()

    def slow_write(item: int) -> None:
        release.wait(5)
        written.append(item)

    writes = BackgroundWrites(slow_write, depth=1)
    real_put = writes._put

    def interrupted_put(item: object, raise_failure: bool = True) -> None:
        if item is block_writer._STOP:  # the stop, queued on the way out
            release.set()
            raise KeyboardInterrupt
        real_put(item, raise_failure)

    monkeypatch.setattr(writes, "_put", interrupted_put)
    with deadline(10), pytest.raises(KeyboardInterrupt), writes:
        writes.submit(1)
        writes.submit(2)  # queued behind the write in progress
        if when == "after an interrupt":
            raise KeyboardInterrupt
    assert not writer_threads()
    assert written == [1]  # the write in progress finished; the queued one was dropped
