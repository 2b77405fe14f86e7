"""A manifest edited by hand (the store's ``fastkd`` attribute) is refused on open in one line
that names the store and each field by its path, by `fastkd inspect`, `inspect --verify`, the
reader training opens and a resuming dump; `inspect --verify` holds the manifest to the arrays as
training does. No traceback, no "verified" for a store training refuses, no memory sized by a
claim."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import NUM_CLASSES, PER_SHARD, create, data, manifest, write  # noqa: F401
from typer.testing import CliRunner

from fastkd.augment import AugmentConfig
from fastkd.cli.main import app
from fastkd.errors import USER_ERROR_EXIT, ConfigError
from fastkd.store import (
    MANIFEST_ATTR,
    Manifest,
    ModelEntry,
    StoreError,
    StoreLayout,
    StoreMismatchError,
    StoreReader,
)
from fastkd.store.integrity import shard_file
from fastkd.store.schema import (
    AUGMENT,
    LAYOUT,
    MANIFEST,
    MAX_BLOCKS,
    MAX_SAMPLES,
    MODEL_ENTRY,
    manifest_problems,
)

Edit = Callable[[dict], object]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, data: dict) -> Path:  # noqa: F811
    """A finished store of two models (sparse with a sampled tail, dense), 40 samples x 3 views
    in 5 blocks of 8."""
    path = tmp_path_factory.mktemp("pristine") / "s"
    with create(path, data) as writer:
        write(writer, data)
    return path


def edited(pristine: Path, into: Path, edit: Edit) -> Path:
    """A copy of the store whose manifest attribute ``edit`` changed (in place, or returned)."""
    shutil.copytree(pristine, into)
    group = zarr.open_group(into, mode="r+")
    stored = copy.deepcopy(dict(group.attrs[MANIFEST_ATTR]))
    replaced = edit(stored)
    group.attrs[MANIFEST_ATTR] = stored if replaced is None else replaced
    return into


def error_line(args: list[str]) -> str:
    """The one ``error:`` line (stderr) of a command refused as bad input."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == USER_ERROR_EXIT, result.output + repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def assert_refused_everywhere(store: Path, expected: str) -> None:
    """`fastkd inspect`, `inspect --verify` and opening the store for training each refuse it,
    naming the store and ``expected``."""
    for args in (["inspect", str(store)], ["inspect", str(store), "--verify", "--no-progress"]):
        line = error_line(args)
        assert str(store) in line and expected in line, line
    with pytest.raises(StoreError) as refused:
        StoreReader(store)
    assert str(store) in str(refused.value) and expected in str(refused.value)


def model(index: int, **changes: object) -> Edit:
    return lambda m: m["models"][index].update(changes)


MALFORMED: dict[str, tuple[Edit, str]] = {
    # the cases: each was a traceback (exit 1)
    "no layout": (lambda m: m.pop("layout") and None, "layout: missing"),
    "extra model key": (model(1, extra=1), "models[1].extra: unknown key"),
    "format_version a string": (
        lambda m: m.update(format_version="4"),
        "format_version: expected an integer, got '4'",
    ),
    "models null": (lambda m: m.update(models=None), "models: expected a list, got None"),
    "topk a string": (model(1, topk="5"), "models[1].topk: expected an integer, got '5'"),
    "num_samples a string": (
        lambda m: m.update(num_samples="40"),
        "num_samples: expected an integer, got '40'",
    ),
    # more of the schema
    "not an object": (lambda m: [m], "manifest: expected an object, got [{"),
    "an int is no bool": (lambda m: m.update(views=True), "views: expected an integer, got True"),
    "no views": (lambda m: m.update(views=0), "views: must be >= 1, got 0"),
    "negative topk": (model(0, topk=-1), "models[0].topk: must be >= 0, got -1"),
    "negative seed": (lambda m: m.update(seed=-1), "seed: must be >= 0, got -1"),
    "missing model key": (lambda m: m["models"][0].pop("tail") and None, "models[0].tail: missing"),
    "class name not a string": (
        lambda m: m["classes"].__setitem__(3, 3),
        "classes[3]: expected a string, got 3",
    ),
    "300 problems in one line": (  # the first 12 named, the rest counted
        lambda m: m.update(classes=list(range(NUM_CLASSES))),
        f"classes[11]: expected a string, got 11; and {NUM_CLASSES - 12} more; dump the pool",
    ),
    "data_config not an object": (
        model(0, data_config=[3, 32, 32]),
        "models[0].data_config: expected an object",
    ),
    "augment pair": (
        lambda m: m["augment"].update(scale=[0.5]),
        "augment.scale: expected 2 items, got 1",
    ),
    "augment range": (
        lambda m: m["augment"].update(hflip=2),
        "flip probability (--hflip) must be in [0, 1], got 2",
    ),
    "extra layout key": (
        lambda m: m["layout"].update(shards=4),
        "layout.shards: unknown key",
    ),
    "chunk not dividing the shard": (
        lambda m: m["layout"].update(chunk_samples=3),
        "layout.chunk_samples: 3 does not divide samples_per_shard 8",
    ),
    "blocks not the samples' ": (
        lambda m: m["layout"].update(num_blocks=4),
        "layout.num_blocks: 4, but 40 samples in shards of 8 make 5",
    ),
    # the pool's own rules (Manifest), reported as the store's too
    "a name twice": (
        model(1, name="small"),
        "model name 'small' appears twice",
    ),
}


@pytest.mark.parametrize(("edit", "expected"), MALFORMED.values(), ids=MALFORMED)
def test_a_malformed_manifest_is_refused_in_one_line_naming_the_field(
    pristine: Path, tmp_path: Path, edit: Edit, expected: str
) -> None:
    assert_refused_everywhere(edited(pristine, tmp_path / "s", edit), expected)


def test_a_valid_store_verifies_and_every_problem_of_an_edited_one_is_named_at_once(
    pristine: Path, tmp_path: Path
) -> None:
    shown = CliRunner().invoke(app, ["inspect", str(pristine)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "blocks 5/5 done (complete)" in shown.output, shown.output
    verify = ["inspect", str(pristine), "--verify", "--no-progress"]
    verified = CliRunner().invoke(app, verify, env={"COLUMNS": "400"})
    assert verified.exit_code == 0 and "verified" in verified.stderr, verified.output
    assert manifest_problems(zarr.open_group(pristine, mode="r").attrs[MANIFEST_ATTR]) == []

    def edit(m: dict) -> None:
        m.update(num_samples="40", seed=None)
        m["models"][0].update(arch=7, topk="5")

    store = edited(pristine, tmp_path / "s", edit)
    line = error_line(["inspect", str(store)])
    for field in ("num_samples", "seed", "models[0].arch", "models[0].topk"):
        assert f"{field}: expected" in line, line
    assert "--overwrite" in line


ABSURD: dict[str, tuple[Edit, str]] = {
    "5 views (the arrays hold 3)": (
        lambda m: m.update(views=5),
        "boxes: shape (40, 3, 4) in the store, (40, 5, 4) by the manifest",
    ),
    "1e12 samples": (
        lambda m: m.update(num_samples=10**12),
        f"num_samples: must be at most {MAX_SAMPLES:,}, got 1,000,000,000,000",
    ),
    "1e12 samples in as many blocks": (
        lambda m: m.update(num_samples=10**12) or m["layout"].update(num_blocks=10**12 // 8),
        f"num_samples: must be at most {MAX_SAMPLES:,}",
    ),
    "1e9 blocks": (
        lambda m: m["layout"].update(num_blocks=10**9),
        f"layout.num_blocks: must be at most {MAX_BLOCKS:,}, got 1,000,000,000",
    ),
    "shards of 9, not 8": (  # a layout consistent in itself: every block read as "damaged"
        lambda m: m["layout"].update(samples_per_shard=9, chunk_samples=9),
        "shards of 8 samples in the store, 9 by the manifest's layout",
    ),
}


@pytest.mark.parametrize(("edit", "expected"), ABSURD.values(), ids=ABSURD)
def test_claims_the_arrays_deny_are_refused_by_inspect_and_verify(
    pristine: Path, tmp_path: Path, edit: Edit, expected: str
) -> None:
    """Before, `inspect --verify` said "verified" for the first four (and plain `inspect`
    summarised them); the shards were every block "damaged"."""
    assert_refused_everywhere(edited(pristine, tmp_path / "s", edit), expected)


def test_verify_holds_class_ids_to_the_manifest_as_training_does(
    tmp_path: Path,
    data: dict,  # noqa: F811
) -> None:
    """A pool of sparse models keeps its arrays' shapes when its classes are edited down: the
    reader then refuses the ids as it decodes them, so `inspect --verify` must not verify."""
    small = manifest().models[0]
    with create(tmp_path / "s", data, manifest(models=[small])) as writer:
        for block in writer.pending_blocks():
            start, stop = writer.block_range(block)
            writer.write_block(block, {"small": data["logits"]["small"][start:stop]})
    fewer = 100

    def edit(m: dict) -> None:
        m.update(num_classes=fewer, classes=m["classes"][:fewer])
        m["models"][0]["num_classes"] = fewer

    store = edited(tmp_path / "s", tmp_path / "edited", edit)
    ids = zarr.open_group(store, mode="r")["models/small/topk_ids"][:]
    first = np.argwhere(ids >= fewer)[0]  # the first id the edited manifest has no class for
    sample, block = int(first[0]), int(first[0]) // PER_SHARD
    shown = CliRunner().invoke(app, ["inspect", str(store)], env={"COLUMNS": "400"})
    assert shown.exit_code == 0, shown.output  # the arrays agree with the manifest
    verify = ["inspect", str(store), "--verify", "--no-progress"]
    listed = CliRunner().invoke(app, verify, env={"COLUMNS": "400"})
    assert listed.exit_code == USER_ERROR_EXIT and "verified" not in listed.output
    bad = f"models/small/topk_ids, block {block} (samples {block * PER_SHARD}-"
    assert bad in listed.stderr, listed.stderr
    value = ids[tuple(first)]
    assert f"sample {sample} holds class id {value}, outside the manifest's 100" in listed.stderr
    reader = StoreReader(store)
    with pytest.raises(StoreError, match=f"topk_ids of sample {sample} holds"):
        reader.read("small", np.array([sample]), np.array([0]))


def test_a_dump_resuming_into_a_malformed_store_refuses_unless_overwrite(
    pristine: Path,
    tmp_path: Path,
    data: dict,  # noqa: F811
) -> None:
    store = edited(pristine, tmp_path / "s", model(1, topk="5"))
    with pytest.raises(StoreError, match=r"models\[1\]\.topk: expected an integer") as refused:
        create(store, data)
    assert not isinstance(refused.value, StoreMismatchError)  # one line, no list below it
    assert "\n" not in str(refused.value)
    with create(store, data, overwrite=True) as writer:
        assert len(writer.pending_blocks()) == 5  # made afresh
    assert manifest_problems(zarr.open_group(store, mode="r").attrs[MANIFEST_ATTR]) == []


def test_fastkd_never_makes_a_store_its_schema_refuses() -> None:
    with pytest.raises(ConfigError, match=f"more than a store may have \\({MAX_BLOCKS:,}\\)"):
        StoreLayout.for_store(MAX_BLOCKS + 1, views=1, samples_per_shard=1)
    with pytest.raises(ConfigError, match=f"num_samples <= {MAX_SAMPLES:,}"):
        manifest(num_samples=MAX_SAMPLES + 1)


def test_the_schema_has_every_field_of_the_manifest() -> None:
    """The schema's keys are the dataclasses' fields (a field added to one is added to both)."""

    def names(cls: type) -> set[str]:
        return {f.name for f in fields(cls)}

    assert set(MANIFEST.fields or {}) == names(Manifest) | {"layout"}
    assert set(MODEL_ENTRY.fields or {}) == names(ModelEntry)
    assert set(LAYOUT.fields or {}) == names(StoreLayout)
    assert set(AUGMENT.fields or {}) == names(AugmentConfig)


def test_a_damaged_keys_array_is_one_line_and_a_named_block(pristine: Path, tmp_path: Path):
    """``inspect`` reads the keys whole (and the skipped flags, all zero here: no shard on
    disk): a shard that does not decode is one line pointing at --verify, which names the block
    (it was a zstd traceback)."""
    array = "keys"
    store = tmp_path / "s"
    shutil.copytree(pristine, store)
    shard = Path(shard_file(store, zarr.open_group(store, mode="r")[array], 0))
    damaged = bytearray(shard.read_bytes())
    damaged[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(damaged))
    line = error_line(["inspect", str(store)])
    assert f"its {array} array cannot be decoded" in line and "--verify" in line, line
    result = CliRunner().invoke(app, ["inspect", str(store), "--verify", "--no-progress"])
    assert result.exit_code == USER_ERROR_EXIT and "Traceback" not in result.output
    assert result.stderr.startswith(f"error: 1 damaged block(s) in {store}:"), result.stderr
    assert f"{array}, block 0 (samples 0-{PER_SHARD - 1})" in result.stderr, result.stderr
