"""The soft-target store: encoding, plain-zarr readability, resume, claims, validation, reads."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from fastkd.augment import AugmentConfig
from fastkd.compression import TailModel
from fastkd.store import (
    Expectation,
    Manifest,
    ModelEntry,
    StoreBusyError,
    StoreError,
    StoreMismatchError,
    StoreReader,
    StoreWriter,
    encode_logits,
    open_manifest,
    resolve_part,
    resolve_topk,
    summarize,
)
from fastkd.store.arrays import hashed_arrays
from fastkd.store.integrity import digest
from fastkd.targets import pool_targets
from fastkd.views import tail_uniforms, view_boxes, view_params

NUM_CLASSES = 300
VIEWS = 3
NUM_SAMPLES = 40
PER_SHARD = 8  # 5 blocks


def manifest(**changes) -> Manifest:
    config = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875}
    models = [
        ModelEntry("small", "resnet18", "ab" * 32, config, NUM_CLASSES, 7, "sampled", 4),
        ModelEntry("wide", "vit_tiny_patch16_224", None, config, NUM_CLASSES, 0),
    ]
    values = {
        "models": models,
        "num_samples": NUM_SAMPLES,
        "views": VIEWS,
        "seed": 11,
        "augment": asdict(AugmentConfig()),
        "fingerprint": "f" * 64,
        "classes": [f"c{i}" for i in range(NUM_CLASSES)],
        "num_classes": NUM_CLASSES,
    }
    return Manifest(**{**values, **changes})


@pytest.fixture(scope="module")
def data() -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, NUM_SAMPLES)
    logits = {
        name: rng.normal(0, 3, (NUM_SAMPLES, VIEWS, NUM_CLASSES)).astype(np.float32)
        for name in ("small", "wide")
    }
    # Push a few labels far below the top-k, so their true logit is not stored among the top-k.
    logits["small"][:5, :, :][np.arange(5)[:, None], :, labels[:5, None]] = -20.0
    return {
        "keys": [f"class{y}/img{i:03d}.png" for i, y in enumerate(labels)],
        "labels": labels,
        "sizes": rng.integers(16, 400, (NUM_SAMPLES, 2)),
        "logits": logits,
    }


def create(path: Path, data: dict, m: Manifest | None = None, **kwargs) -> StoreWriter:
    return StoreWriter.create_or_resume(
        path, m or manifest(), data["keys"], data["labels"], data["sizes"],
        samples_per_shard=PER_SHARD, **kwargs,
    )  # fmt: skip


def write(writer: StoreWriter, data: dict, blocks: list[int] | None = None) -> None:
    for block in writer.pending_blocks() if blocks is None else blocks:
        start, stop = writer.block_range(block)
        writer.write_block(block, {k: v[start:stop] for k, v in data["logits"].items()})


def reference(
    logits: np.ndarray, labels: np.ndarray, k: int, first_sample: int = 0, draws: int = 4
) -> dict[str, np.ndarray]:
    """Independent fp64 reference of what a model stores (docs/store-format.md): log-softmax,
    top-k, the tail's two masses summed over its classes, systematic draws with numpy."""
    z = torch.from_numpy(logits).double()
    logprobs = z.log_softmax(-1)
    y = torch.from_numpy(labels)[:, None, None].expand(-1, z.shape[1], 1)
    values, ids = logprobs.topk(k, dim=-1)
    known = torch.zeros_like(z, dtype=torch.bool).scatter(-1, ids, True).scatter(-1, y, True)
    tail = logprobs.masked_fill(known, -math.inf)
    log_tail = tail.logsumexp(-1)
    n, views = z.shape[:2]
    uniforms = tail_uniforms(
        11,
        np.repeat(np.arange(first_sample, first_sample + n), views),
        np.tile(np.arange(views), n),
        0,
    ).reshape(n, views)
    weights = (tail - log_tail[..., None]).exp().numpy()
    tail_ids = np.empty((n, views, draws), dtype=np.int64)
    for row in np.ndindex(n, views):
        cdf = np.cumsum(weights[row])
        tail_ids[row] = np.searchsorted(
            cdf / cdf[-1], (uniforms[row] + np.arange(draws)) / draws, "right"
        )
    return {
        "true_logprob": logprobs.gather(-1, y).squeeze(-1).numpy(),
        "logprobs": logprobs.numpy(),
        "topk_logprobs": values.numpy(),
        "topk_ids": ids.numpy(),
        "log_tail": log_tail.numpy(),
        "log_tail_sqrt": (tail / 2).logsumexp(-1).numpy(),
        "tail_ids": tail_ids,
    }


def assert_stored(stored: Mapping[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    """Stored arrays (those present) equal the fp64 reference: fp32 ones to fp32 rounding, fp16
    ones to fp16 rounding, ids exactly."""
    for name, values in stored.items():
        expected = ref[name]
        if name.endswith("ids"):
            np.testing.assert_array_equal(values, expected, err_msg=name)
        elif values.dtype == np.float16:
            np.testing.assert_allclose(values, expected, rtol=2**-11, atol=1e-7, err_msg=name)
        else:
            assert values.dtype == np.float32, name
            np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_resolve_topk_rule() -> None:
    assert resolve_topk(10, 10) == 0 and resolve_topk(100, 10) == 0  # small: dense
    assert resolve_topk(1000, 10) == 10 and resolve_topk(1000, 5) == 5
    assert resolve_topk(1000, 0) == 0  # dense when asked
    assert resolve_topk(129, 100) == 0  # 2*129 = 258 <= 1.25 * 100 * 4 = 500
    assert resolve_topk(200, 40) == 40  # 400 > 1.25 * 40 * 4 = 200
    assert resolve_topk(70000, 20000) == 0  # uint32 ids: 140000 <= 1.25 * 20000 * 6
    assert resolve_topk(70000, 100) == 100
    assert resolve_topk(10, 3, "bucket") == 3  # a named tail asks for sparse targets
    assert resolve_topk(10, 10, "bucket") == 0  # nothing would be left in the tail


def test_encode_matches_fp64_reference(data: dict) -> None:
    logits, labels = data["logits"]["small"], data["labels"]
    ref = reference(logits, labels, 7)
    sparse = encode_logits(logits, labels, manifest().models[0], seed=11)
    assert set(sparse) == {
        "true_logprob", "topk_logprobs", "topk_ids", "log_tail", "log_tail_sqrt", "tail_ids"
    }  # fmt: skip
    assert sparse["topk_ids"].dtype == sparse["tail_ids"].dtype == np.uint16
    assert sparse["topk_logprobs"].dtype == np.float16
    assert_stored(sparse, ref)
    # The labels pushed to -20 are outside the top-k, yet p(y) is exact from the stored fp32.
    assert not (sparse["topk_ids"][:5] == labels[:5, None, None]).any()
    # No draw lands on a known class (top-k or label): the tail is what is outside them.
    drawn = sparse["tail_ids"].astype(np.int64)
    assert not (drawn[..., :, None] == sparse["topk_ids"][..., None, :]).any()
    assert not (drawn == labels[:, None, None]).any()
    entry = manifest().models[1]
    dense = encode_logits(torch.from_numpy(logits).to(torch.bfloat16), labels, entry)
    bf16 = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()
    assert set(dense) == {"logprobs", "true_logprob"}
    assert_stored(dense, reference(bf16, labels, 1))


def test_tail_mass_is_exact_where_one_minus_the_head_is_not() -> None:
    """Confident rows with logits of real magnitudes: the stored tail mass is exact to fp32
    rounding; 1 minus the top-k kept as fp16 logits (format 1) was off by far more."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (64, 1, 1000)).astype(np.float32) + 20.0
    logits[:, 0, 0] += np.linspace(8, 16, 64, dtype=np.float32)  # top-1 p from ~0.7 to ~0.9999
    labels = np.zeros(64, dtype=np.int64)
    entry = ModelEntry("m", "resnet18", None, {}, 1000, 10, "bucket")
    stored = encode_logits(logits, labels, entry)
    exact = np.exp(reference(logits, labels, 10)["log_tail"])
    np.testing.assert_allclose(np.exp(stored["log_tail"]), exact, rtol=1e-5)
    z = torch.from_numpy(logits)
    top = z.topk(10, dim=-1).values
    old = 1 - (top.half().double() - z.logsumexp(-1, keepdim=True).double()).exp().sum(-1)
    assert np.median(np.abs(old.numpy() / exact - 1)) > 0.05


def test_manifest_checks_each_model_tail() -> None:
    config = manifest().models[0].data_config
    bad = [
        ModelEntry("a", "resnet18", None, config, NUM_CLASSES, 7, "wide"),
        ModelEntry("b", "resnet18", None, config, NUM_CLASSES, 7, "bucket", 4),
        ModelEntry("c", "resnet18", None, config, NUM_CLASSES, 7, "sampled", 0),
        ModelEntry("d", "resnet18", None, config, NUM_CLASSES, 0, "bucket"),
    ]
    with pytest.raises(ValueError, match="invalid manifest") as error:
        manifest(models=bad)
    message = str(error.value)
    assert "model 'a': tail must be one of uniform, bucket, sampled, got 'wide'" in message
    assert (
        "model 'b': tail_samples must be in [1, 64] exactly for the sampled tail (0 otherwise), got 4"
        in message
    )
    assert "model 'c': tail_samples" in message
    assert "model 'd' is dense: it has no tail" in message


def test_a_format_1_store_is_refused_with_what_to_do(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "s", data) as writer:
        write(writer, data, [0])
    group = zarr.open_group(tmp_path / "s", mode="r+", zarr_format=3)
    group.attrs["fastkd"] = {**group.attrs["fastkd"], "format_version": 1}
    with pytest.raises(StoreMismatchError, match="format_version: store has 1, expected 4") as err:
        StoreReader(tmp_path / "s", allow_incomplete=True)
    assert "dump the pool again (--overwrite)" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"views": VIEWS - 1}, rf"flips: shape \({NUM_SAMPLES}, {VIEWS}\) in the store, "
                               rf"\({NUM_SAMPLES}, {VIEWS - 1}\) by the manifest"),
        ({"num_samples": NUM_SAMPLES - 1}, rf"labels: shape \({NUM_SAMPLES},\) in the store"),
        ({"rename": "tiny"}, r"models/tiny/true_logprob: missing"),
        ({"topk": 5}, r"models/small/topk_ids: shape .* in the store, .* by the manifest"),
    ],
)  # fmt: skip
def test_an_edited_manifest_is_refused_naming_both_values(
    tmp_path: Path, data: dict, edit: dict, expected: str
) -> None:
    with create(tmp_path / "s", data) as writer:
        write(writer, data)
    group = zarr.open_group(tmp_path / "s", mode="r+", zarr_format=3)
    stored = dict(group.attrs["fastkd"])
    if "rename" in edit:
        stored["models"] = [{**stored["models"][0], "name": edit["rename"]}, *stored["models"][1:]]
    elif "topk" in edit:
        stored["models"] = [{**stored["models"][0], "topk": edit["topk"]}, *stored["models"][1:]]
    else:
        stored.update(edit)
    group.attrs["fastkd"] = stored
    with pytest.raises(StoreError, match=expected) as refused:
        StoreReader(tmp_path / "s")
    assert "disagree with its manifest" in str(refused.value)


def test_encode_rejects_bad_input(data: dict) -> None:
    logits = data["logits"]["small"][:2].copy()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 300\)"):
        encode_logits(logits, np.array([0, 300]), manifest().models[0])
    logits[1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_logits(logits, np.array([0, 1]), manifest().models[0])


def read_with_plain_zarr(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Everything in a store through zarr alone, as docs/store-format.md describes."""
    import zarr

    group = zarr.open_group(path, mode="r")
    manifest = group.attrs["fastkd"]
    shared = ("keys", "labels", "sizes", "boxes", "flips", "skipped")
    arrays = {name: group[name][:] for name in shared}
    arrays["status"] = group.attrs.get("fastkd_status")
    for model in manifest["models"]:
        member = group[f"models/{model['name']}"]
        for name in member.array_keys():
            arrays[f"{model['name']}/{name}"] = member[name][:]
    arrays["blocks_done"] = group["blocks_done"][:]
    return manifest, arrays


def test_plain_zarr_reads_what_was_written(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "s", data) as writer:
        write(writer, data)
    meta, arrays = read_with_plain_zarr(tmp_path / "s")

    assert meta["format_version"] == 4 and meta["fingerprint"] == "f" * 64
    assert [(m["topk"], m["tail"], m["tail_samples"]) for m in meta["models"]] == [
        (7, "sampled", 4),
        (0, None, 0),
    ]
    assert arrays["keys"].tolist() == data["keys"]
    np.testing.assert_array_equal(arrays["labels"], data["labels"])
    np.testing.assert_array_equal(arrays["sizes"], data["sizes"])
    boxes, flips = view_boxes(11, np.arange(NUM_SAMPLES), VIEWS, data["sizes"], AugmentConfig())
    assert arrays["boxes"].dtype == np.uint16  # integer pixels (top, left, height, width)
    np.testing.assert_array_equal(arrays["boxes"], boxes)
    np.testing.assert_array_equal(arrays["flips"], flips)
    assert arrays["blocks_done"].tolist() == [1] * 5

    for model, arrays_of in (("small", 6), ("wide", 2)):
        stored = {k.split("/")[1]: v for k, v in arrays.items() if k.startswith(f"{model}/")}
        assert len(stored) == arrays_of, sorted(stored)
        assert_stored(stored, reference(data["logits"][model], data["labels"], 7))

    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file() and ".fastkd" not in p.parts]
    shards_per_array = sum(p.is_file() for p in (tmp_path / "s/models/small/log_tail/c").rglob("*"))
    assert shards_per_array == 5  # one file per block, not per chunk or sample
    assert len(files) < 100


def store_bytes(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".fastkd" not in p.parts
    }


def test_resume_writes_only_pending_blocks_and_ends_bit_identical(
    tmp_path: Path, data: dict
) -> None:
    with create(tmp_path / "whole", data) as writer:
        write(writer, data)

    with create(tmp_path / "resumed", data) as writer:
        assert writer.pending_blocks() == [0, 1, 2, 3, 4]
        write(writer, data, [0, 2])
        # A crash half-way through block 3: its model arrays are written, its marker is not.
        start, stop = writer.block_range(3)
        torn = {k: -v[start:stop] for k, v in data["logits"].items()}
        writer.write_block(3, torn)
        writer._done[3] = 0
    with create(tmp_path / "resumed", data) as writer:
        assert writer.pending_blocks() == [1, 3, 4]
        assert writer.pending_blocks(part=(1, 2)) == [1, 3]
        write(writer, data)
        assert writer.pending_blocks() == []
    assert store_bytes(tmp_path / "resumed") == store_bytes(tmp_path / "whole")


def test_another_configuration_is_refused_unless_overwrite(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "s", data) as writer:
        write(writer, data, [0])
    entry = replace(manifest().models[0], checkpoint_sha256="cd" * 32)
    other = manifest(models=[entry, manifest().models[1]], seed=12)
    with pytest.raises(StoreMismatchError) as err:
        create(tmp_path / "s", data, other)
    message = str(err.value)
    assert (
        "models[small].checkpoint_sha256: store has 'abab" in message
        and "expected 'cdcd" in message
    )
    assert "seed: store has 11, expected 12" in message and "--overwrite" in message
    with create(tmp_path / "s", data) as writer:  # nothing was lost
        assert writer.pending_blocks() == [1, 2, 3, 4]

    shuffled = {**data, "labels": np.roll(data["labels"], 1)}
    with pytest.raises(StoreMismatchError, match=r"labels: .* differ"):
        create(tmp_path / "s", shuffled)

    with create(tmp_path / "s", data, other, overwrite=True) as writer:
        assert writer.pending_blocks() == [0, 1, 2, 3, 4]
        assert writer.manifest.seed == 12


def test_foreign_directory_is_never_touched(tmp_path: Path, data: dict) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="is not a fastkd store"):
        create(tmp_path / "mine", data, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_bad_labels_are_named(tmp_path: Path, data: dict) -> None:
    bad = {**data, "labels": data["labels"].copy()}
    bad["labels"][6] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"sample 6 \(class\d+/img006.png\) has label 300"):
        create(tmp_path / "s", bad)


def test_uncoordinated_writers_refused_coordinated_parts_accepted(
    tmp_path: Path, data: dict
) -> None:
    path = tmp_path / "s"
    first = create(path, data)
    with pytest.raises(StoreBusyError, match=r"part 1/2 overlaps the live claim .* part 0/1"):
        create(path, data, part=(1, 2))
    first.close()

    even, odd = create(path, data, part=(0, 2)), create(path, data, part=(1, 2))
    assert even.pending_blocks() == [0, 2, 4] and odd.pending_blocks() == [1, 3]
    with pytest.raises(StoreBusyError, match=r"delete .*claims"):
        create(path, data, part=(0, 4))  # blocks 0 and 4 belong to the live 0/2
    with pytest.raises(ValueError, match="belongs to part 1/2"):
        even.write_block(1, {})
    write(even, data)
    write(odd, data)
    even.close()
    odd.close()
    assert StoreReader(path).pending_blocks() == []


def test_dead_or_forced_claims_are_freed(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "s"
    create(path, data).close()
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    claim = next(iter((path / ".fastkd" / "claims").glob("*.json")), None)
    assert claim is None  # closing released the claim
    live = create(path, data)
    record = json.loads(next((path / ".fastkd" / "claims").glob("*.json")).read_text())
    record.update(pid=dead_pid, run_id="dead")
    (path / ".fastkd" / "claims" / "dead.json").write_text(json.dumps(record))
    live.close()
    create(path, data).close()  # the dead pid's claim does not block
    assert not (path / ".fastkd" / "claims" / "dead.json").exists()

    holder = create(path, data)
    forced = create(path, data, force_claim=True)
    with pytest.raises(StoreBusyError, match="was removed"):
        write(holder, data, [0])
    forced.close()
    holder.close()


def spawn_writer(tmp_path: Path, data: dict, part: tuple[int, int], then: str) -> subprocess.Popen:
    """Another process that opens ``tmp_path / "s"`` as part ``i/n``, then runs ``then``."""
    if not (tmp_path / "inputs.npz").exists():
        logits = {f"logits_{name}": v for name, v in data["logits"].items()}
        np.savez(tmp_path / "inputs.npz", labels=data["labels"], sizes=data["sizes"], **logits)
        meta = {"keys": data["keys"], "manifest": manifest().to_dict()}
        (tmp_path / "meta.json").write_text(json.dumps(meta))
    script = textwrap.dedent(f"""
        import json, time
        import numpy as np, zarr
        from pathlib import Path
        from fastkd.store import Manifest, StoreWriter
        d = Path({str(tmp_path)!r})
        inputs, meta = np.load(d / "inputs.npz"), json.loads((d / "meta.json").read_text())
        writer = StoreWriter.create_or_resume(
            d / "s", Manifest.from_dict(meta["manifest"]), meta["keys"], inputs["labels"],
            inputs["sizes"], samples_per_shard={PER_SHARD}, part={part})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", script + textwrap.dedent(then)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def test_ranks_creating_at_once_share_one_store(tmp_path: Path, data: dict) -> None:
    then = "print(writer.pending_blocks())\nwriter.close()"
    ranks = [spawn_writer(tmp_path, data, (r, 2), then) for r in (0, 1)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [r.returncode for r in ranks] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["[0, 2, 4]", "[1, 3]"]
    _, arrays = read_with_plain_zarr(tmp_path / "s")
    assert arrays["keys"].tolist() == data["keys"]


def test_sigkilled_writer_resumes_bit_identical(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "whole", data) as writer:
        write(writer, data)
    # Blocks 0 and 1 complete; block 2 killed after its first array, before its marker.
    then = """
        def write(block):
            start, stop = writer.block_range(block)
            models = writer.manifest.models
            writer.write_block(block, {m.name: inputs[f"logits_{m.name}"][start:stop] for m in models})
        write(0)
        write(1)
        plain_setitem = zarr.Array.__setitem__
        def setitem_then_hang(self, key, value):
            plain_setitem(self, key, value)
            print("torn", flush=True)
            time.sleep(120)
        zarr.Array.__setitem__ = setitem_then_hang
        write(2)
    """
    child = spawn_writer(tmp_path, data, (0, 1), then)
    assert child.stdout.readline().strip() == "torn", child.stderr.read()
    child.kill()  # SIGKILL: no cleanup, its claim stays behind
    child.wait(timeout=30)
    assert list((tmp_path / "s" / ".fastkd" / "claims").glob("*.json"))

    with create(tmp_path / "s", data) as writer:  # the dead writer's claim does not block
        assert writer.pending_blocks() == [2, 3, 4]
        write(writer, data)
    assert store_bytes(tmp_path / "s") == store_bytes(tmp_path / "whole")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data: dict) -> Path:
    path = tmp_path_factory.mktemp("finished") / "s"
    with create(path, data) as writer:
        write(writer, data)
    return path


def test_expectation_mismatch_names_the_field(finished: Path) -> None:
    StoreReader(
        finished, Expectation(fingerprint="f" * 64, num_classes=NUM_CLASSES, models=["small"])
    )
    expect = Expectation(
        fingerprint="0" * 64,
        num_classes=1000,
        models=["small", "teacher"],
        data_configs={"small": {"mean": [0.485, 0.456, 0.406], "crop_pct": 0.875}},
    )
    with pytest.raises(StoreMismatchError) as err:
        StoreReader(finished, expect)
    message = str(err.value)
    assert f"fingerprint: store has '{'f' * 64}', expected '{'0' * 64}'" in message
    assert "num_classes: store has 300, expected 1000" in message
    assert "expected it to contain ['teacher']" in message
    assert "models[small].data_config.mean: store has [0.5, 0.5, 0.5]" in message
    assert "crop_pct" not in message  # equal fields are not reported


def test_incomplete_store_refused_for_reading(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "s", data) as writer:
        write(writer, data, [0, 1])
    with pytest.raises(StoreError, match="incomplete: 3 of 5 blocks") as refused:
        StoreReader(tmp_path / "s")
    assert "`fastkd dump` command again" in str(refused.value)  # the CLI's way, no keyword
    assert "allow_incomplete" not in str(refused.value)
    reader = StoreReader(tmp_path / "s", allow_incomplete=True)
    assert reader.read("small", np.array([3, 15]), np.array([0, 2])).log_tail.shape == (2,)
    with pytest.raises(StoreError, match=r"sample 16 .* block 2, not written"):
        reader.read("small", np.array([3, 16]), np.array([0, 2]))


@pytest.mark.parametrize("cache_bytes", [1, 1 << 30], ids=["one-block-cache", "all-cached"])
def test_random_access_reads_match_written(finished: Path, data: dict, cache_bytes: int) -> None:
    reader = StoreReader(finished, cache_bytes=cache_bytes)
    rng = np.random.default_rng(5)
    for _ in range(3):
        samples = rng.integers(0, NUM_SAMPLES, 50)
        views = rng.integers(0, VIEWS, 50)
        for model in ("small", "wide"):
            rows = reader.read(model, samples, views)
            ref = reference(data["logits"][model], data["labels"], 7)
            ref = {name: values[samples, views] for name, values in ref.items()}
            assert_stored({k: v for k, v in vars(rows).items() if v is not None}, ref)
        boxes, flips = reader.view_params(samples, views)
        full_boxes, full_flips = view_params(
            11, samples, VIEWS, data["sizes"][samples], AugmentConfig()
        )
        np.testing.assert_array_equal(boxes, full_boxes[np.arange(50), views])
        np.testing.assert_array_equal(flips, full_flips[np.arange(50), views])
    np.testing.assert_array_equal(reader.labels, data["labels"])
    assert reader.keys == data["keys"]
    with pytest.raises(IndexError, match="sample 40 is outside"):
        reader.read("small", np.array([40]), np.array([0]))
    with pytest.raises(KeyError, match="model 'nope' is not in the store"):
        reader.read("nope", np.array([0]), np.array([0]))


def test_damaged_topk_ids_are_found_as_their_block_is_decoded(
    tmp_path: Path, finished: Path
) -> None:
    """Ids out of range with a matching block hash (as a faulty writer would leave them): the
    range check, the second line behind the hashes (test_integrity.py), still refuses them."""
    path = tmp_path / "damaged"
    shutil.copytree(finished, path)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    ids = group["models/small/topk_ids"]
    ids[19, 1, 3] = NUM_CLASSES  # one id past the classes, in block 2 (samples 16..23)
    column = hashed_arrays(open_manifest(path)[0]).index("models/small/topk_ids")
    group["block_hashes"][2, column] = digest(ids[16:24])
    reader = StoreReader(path)
    assert reader.read("small", np.array([0, 39]), np.array([1, 2])).topk_ids.shape == (2, 7)
    with pytest.raises(
        StoreError, match=rf"model 'small'.*topk_ids of sample 19 holds {NUM_CLASSES}"
    ):
        reader.read("small", np.array([16]), np.array([0]))  # any row of the damaged block


def test_read_pool_stacks_models(finished: Path, data: dict) -> None:
    reader = StoreReader(finished)
    samples, views = np.array([0, 39, 17]), np.array([2, 0, 1])
    with pytest.raises(ValueError, match="one storage mode"):
        reader.read_pool(None, samples, views)
    sparse = reader.read_pool(["small", "small"], samples, views)  # M = 2 (one model twice)
    assert sparse.tail == "sampled"
    assert sparse.true_logprob.shape == sparse.log_tail.shape == (3, 2)
    assert sparse.true_logprob.dtype == sparse.log_tail.dtype == np.float32
    assert sparse.log_tail_sqrt.dtype == np.float16
    assert sparse.topk_logprobs.shape == sparse.topk_ids.shape == (3, 2, 7)
    assert sparse.topk_logprobs.dtype == np.float16 and sparse.topk_ids.dtype == np.uint16
    assert sparse.tail_ids.shape == (3, 2, 4) and sparse.logprobs is None
    one = reader.read("small", samples, views)
    for member in range(2):
        for name in ("true_logprob", "topk_logprobs", "topk_ids", "log_tail", "tail_ids"):
            np.testing.assert_array_equal(getattr(sparse, name)[:, member], getattr(one, name))
    dense = reader.read_pool(["wide"], samples, views)
    wide = reader.read("wide", samples, views)
    assert dense.logprobs.shape == (3, 1, NUM_CLASSES) and dense.logprobs.dtype == np.float16
    assert dense.topk_logprobs is None and dense.log_tail is None and dense.tail is None
    for name in ("true_logprob", "logprobs"):
        np.testing.assert_array_equal(getattr(dense, name)[:, 0], getattr(wide, name))


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
def test_a_store_is_read_with_the_tail_it_was_written_with(
    tmp_path: Path, data: dict, tail: str
) -> None:
    """The tail model is the manifest's, not today's DEFAULT_TAIL: a store written while bucket
    was the default still trains with the bucket tail."""
    sparse = replace(manifest().models[0], tail=tail, tail_samples=0)
    with create(tmp_path / "s", data, manifest(models=[sparse, manifest().models[1]])) as writer:
        write(writer, data)
    arrays = StoreReader(tmp_path / "s").read_pool(["small"], np.array([0, 39]), np.array([2, 0]))
    assert arrays.tail is TailModel(tail) and arrays.tail_ids is None
    assert pool_targets(arrays).tail is TailModel(tail)


def test_summary_counts_bytes(finished: Path) -> None:
    summary = summarize(finished)
    assert summary.blocks_done == 5 and summary.skipped == []
    mass = next(a for a in summary.arrays if a.path == "models/small/log_tail")
    assert mass.shape == (NUM_SAMPLES, VIEWS) and mass.nbytes == NUM_SAMPLES * VIEWS * 4
    per_view = sum(a.nbytes_stored for a in summary.arrays if a.path.startswith("models/small/"))
    assert summary.bytes_per_view("small") == per_view / (NUM_SAMPLES * VIEWS)


def test_resolve_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert resolve_part(None) == (0, 1)
    assert resolve_part("3/8") == (3, 8)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_part(None) == (2, 4)
    with pytest.raises(ValueError, match="i/n"):
        resolve_part("3-8")
    with pytest.raises(ValueError, match="0 <= i < n"):
        resolve_part("8/8")


def test_skipped_images_are_recorded(tmp_path: Path, data: dict) -> None:
    with create(tmp_path / "s", data) as writer:
        with pytest.raises(ValueError, match=r"skipped offsets must be in \[0, 8\)"):
            writer.write_block(1, {k: v[8:16] for k, v in data["logits"].items()}, skipped=[9])
        start, stop = writer.block_range(1)
        writer.write_block(1, {k: v[start:stop] for k, v in data["logits"].items()}, skipped=[1, 3])
        write(writer, data, [0, 2, 3, 4])
    assert StoreReader(tmp_path / "s").skipped.nonzero()[0].tolist() == [9, 11]
    assert summarize(tmp_path / "s").skipped == [data["keys"][9], data["keys"][11]]
    _, arrays = read_with_plain_zarr(tmp_path / "s")
    assert arrays["skipped"].nonzero()[0].tolist() == [9, 11]
    assert arrays["status"] == {"complete": True, "skipped": [data["keys"][9], data["keys"][11]]}


def test_inspect_command(finished: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from fastkd.cli import inspect_cmd

    app = typer.Typer()
    app.callback()(lambda: None)  # a command group, as in the real app
    inspect_cmd.register(app)
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(finished)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    summary = summarize(finished)
    assert "blocks 5/5 done (complete)" in shown.output
    assert f"{summary.bytes_per_view('small'):.2f}" in shown.output and "top-7" in shown.output
    assert "models/wide/logprobs" in shown.output and "dense" in shown.output
    assert "top-7, sampled tail x4" in shown.output
    as_json = json.loads(runner.invoke(app, ["inspect", str(finished), "--json"]).output)
    assert as_json["bytes_per_view"]["small"] == summary.bytes_per_view("small")
    assert as_json["manifest"]["models"][0]["topk"] == 7
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 2
    assert "is not a fastkd store" in re.sub(r"[\s│]+", " ", missing.output)  # unwrap rich's panel
