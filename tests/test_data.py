"""Data sets (image folder, file list, fingerprint, header sizes) and the view loaders, checked
against torchvision (ImageFolder order; resized_crop + flip + normalise) and against each other."""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from reference_views import reference_inputs

from fastkd.augment import AugmentConfig
from fastkd.data import (
    BadImageError,
    DatasetError,
    ImageDataset,
    open_dataset,
    plan_batches,
    resolve_backend,
    view_loader,
)
from fastkd.data.nvjpeg import device_decodable
from fastkd.data.wholeness import incomplete
from fastkd.errors import ConfigError
from fastkd.models import ModelSpec, load_model
from fastkd.views import all_views, pixel_box

if TYPE_CHECKING:
    from digits_pool import PoolMember

pytest_plugins = ("digits_pool",)

VIEWS = 3
# DALI's resampling differs from PIL's at the image border (PIL renormalises the clipped filter,
# DALI clamps), by up to ~15 grey levels on the outermost row/column after a strong downscale;
# inside, to a few levels (4 measured: bicubic upscaling of sharp digit strokes), and on average
# to a fraction of one (0.13-0.25 measured).
INTERIOR_MAX_GREY = 4.0
MEAN_GREY = 0.5
# Model outputs on the two backends' images: the trained digit models' logits span about +-4 and
# +-20; measured max differences 0.013 and 0.086, top-1 agreement 100% and 99.2%.
LOGIT_ATOL = 0.25
TOP1_AGREEMENT = 0.95


def _items(dataset: ImageDataset, views: int = VIEWS, seed: int = 0) -> dict[str, np.ndarray]:
    """All views of every sample, sample-major, with their replayed crops and flips."""
    return all_views(seed, np.arange(len(dataset)), views, dataset.sizes, AugmentConfig())


def _load(dataset: ImageDataset, items: dict, configs: list[dict], **kwargs) -> list:
    return list(
        view_loader(
            dataset,
            items["samples"],
            items["views"],
            items["boxes"],
            items["flips"],
            configs,
            **{"batch_size": 16, "num_workers": 0, **kwargs},
        )
    )


def _stack(batches: list, config: int) -> torch.Tensor:
    return torch.cat([b.images[config] for b in batches])


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smooth random images of several sizes and aspect ratios, PNG and JPEG, in two classes."""
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(37, 53), (64, 48), (120, 90), (33, 33), (90, 160)]):
        folder = root / f"class{index % 2}"
        folder.mkdir(exist_ok=True)
        coarse = (rng.random((height // 4 + 2, width // 4 + 2, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / f"img{index}.{'jpg' if index % 2 else 'png'}", quality=90)
    return root


# -- data sets ---------------------------------------------------------------------------------


def test_image_folder_matches_torchvision(digits_small: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(digits_small, tmp_path / "data"))
    (root / "3" / "nested").mkdir()
    shutil.copy(next((root / "3").glob("*.png")), root / "3" / "nested" / "a.png")
    (root / "3" / "notes.txt").write_text("not an image")
    dataset = open_dataset(root)
    reference = torchvision.datasets.ImageFolder(root)
    assert dataset.classes == reference.classes
    assert [str(root / key) for key in dataset.keys] == [path for path, _ in reference.samples]
    assert dataset.labels.tolist() == reference.targets
    assert "3/nested/a.png" in dataset.keys


def test_symbolic_link_loops_and_repeats_are_refused(digits_small: Path, tmp_path: Path) -> None:
    """A link back up the tree would read every class again under one label; a second link to
    one folder would read its images twice. Both are refused, naming the folder."""
    root = Path(shutil.copytree(digits_small, tmp_path / "data"))
    (root / "3" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"3/loop.*again"):
        open_dataset(root)
    (root / "3" / "loop").unlink()
    (root / "3" / "copy").symlink_to(root / "4", target_is_directory=True)
    with pytest.raises(DatasetError, match=r"again \(through a symbolic link\)"):
        open_dataset(root)
    (root / "3" / "copy").unlink()
    (root / "3" / "inside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(next((root / "3").glob("*.png")), tmp_path / "elsewhere" / "b.png")
    assert "3/inside/b.png" in open_dataset(root).keys  # a link to a folder seen once is fine


def test_file_list(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "a b").mkdir(parents=True)
    for name, size in [("a b/x 1.png", (20, 10)), ("y.png", (8, 30))]:
        Image.new("RGB", size).save(images / name)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text("# path label\n\na b/x 1.png 2\n  y.png\t0\n")
    dataset = open_dataset(listing, root=images)
    assert dataset.keys == ["a b/x 1.png", "y.png"]
    assert dataset.labels.tolist() == [2, 0]
    assert dataset.classes == [] and dataset.num_classes == 3  # named by index
    assert dataset.sizes.tolist() == [[10, 20], [30, 8]]  # (height, width)
    # Relative to the list's own folder by default.
    (tmp_path / "here.txt").write_text("images/y.png 1\n")
    assert open_dataset(tmp_path / "here.txt").keys == ["images/y.png"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("y.png cat\n", r"list.txt:1: label 'cat' is not a class index"),
        ("y.png 0\nmissing.png 1\n", r"list.txt:2: image .*missing.png does not exist"),
        (
            "y.png 0\n# again\ny.png 0\n",
            r"list.txt:3: y.png is listed twice \(first at .*list.txt:1\)",
        ),
        ("y.png\n", r"list.txt:1: expected 'relative/path label'"),
        ("../y.png 0\n", r"list.txt:1: path '../y.png' must be relative"),
        ("# nothing\n", r"lists no images"),
    ],
)
def test_file_list_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "y.png")
    (tmp_path / "list.txt").write_text(content)
    with pytest.raises(DatasetError, match=message):
        open_dataset(tmp_path / "list.txt")


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="no class subfolders"):
        open_dataset(tmp_path / "flat")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images in its 1 class folders"):
        open_dataset(tmp_path / "empty")


def test_fingerprint_tracks_files_not_listing(digits_small: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(digits_small, tmp_path / "data"))
    folder = open_dataset(root)
    # The same files through a shuffled file list: the same fingerprint.
    lines = [f"{k} {y}" for k, y in zip(folder.keys, folder.labels, strict=True)]
    np.random.default_rng(0).shuffle(lines)
    (root / "list.txt").write_text("\n".join(lines))
    assert open_dataset(root / "list.txt").fingerprint() == folder.fingerprint()

    first = root / folder.keys[0]
    changes = {
        "added": lambda: shutil.copy(first, root / "0" / "new.png"),
        "rewritten": lambda: first.write_bytes(first.read_bytes() + b"\0"),
        "renamed": lambda: first.rename(first.with_name("renamed.png")),
    }
    seen = {folder.fingerprint()}
    for name, change in changes.items():
        change()
        fingerprint = open_dataset(root).fingerprint()
        assert fingerprint not in seen, name
        seen.add(fingerprint)


def test_sizes_come_from_headers(varied: Path, tmp_path: Path) -> None:
    dataset = open_dataset(varied)
    decoded = [Image.open(dataset.path(i)).convert("RGB") for i in range(len(dataset))]
    assert dataset.sizes.tolist() == [[image.height, image.width] for image in decoded]

    root = Path(shutil.copytree(varied, tmp_path / "data"))
    (root / "class0" / "garbage.png").write_bytes(b"definitely not a png")
    broken = open_dataset(root)
    sizes, unreadable = broken.read_sizes()
    bad = broken.keys.index("class0/garbage.png")
    assert list(unreadable) == [bad] and "UnidentifiedImageError" in unreadable[bad]
    assert sizes[bad].tolist() == [1, 1]
    with pytest.raises(BadImageError, match=rf"garbage\.png \(sample {bad}\)"):
        _ = broken.sizes


# -- loaders -----------------------------------------------------------------------------------


def test_plan_batches_never_straddle_a_break() -> None:
    plan = [b.tolist() for b in plan_batches(10, 4, breaks=[6, 0, 10, 42])]
    assert plan == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert [b.tolist() for b in plan_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert plan_batches(0, 3) == []
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(4, 0)


def test_torch_backend_equals_torchvision(varied: Path, digit_pool: list[PoolMember]) -> None:
    dataset = open_dataset(varied)
    items = _items(dataset)
    configs = [m.data_config for m in digit_pool]
    batches = _load(dataset, items, configs, backend="torch", batch_size=4, breaks=[7])
    assert [len(b.samples) for b in batches] == [4, 3, 4, 4]
    assert torch.cat([b.samples for b in batches]).tolist() == items["samples"].tolist()
    assert torch.cat([b.views for b in batches]).tolist() == items["views"].tolist()
    assert (
        torch.cat([b.labels for b in batches]).tolist() == dataset.labels[items["samples"]].tolist()
    )
    sizes = dataset.sizes
    for index, config in enumerate(configs):
        ours = _stack(batches, index)
        assert ours.shape == (len(items["samples"]), *config["input_size"])
        reference = torch.stack(
            [
                reference_inputs(dataset.path(s), pixel_box(box, *sizes[s]), flip, config)
                for s, box, flip in zip(
                    items["samples"], items["boxes"], items["flips"], strict=True
                )
            ]
        )
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def _grey_levels(a: torch.Tensor, b: torch.Tensor, config: dict) -> torch.Tensor:
    """|a - b| of normalised images, in 0-255 grey levels."""
    return (a - b).abs() * torch.tensor(config["std"]).view(1, 3, 1, 1) * 255


def test_dali_matches_torch(varied: Path, digits_small: Path, digit_pool: list[PoolMember]) -> None:
    pytest.importorskip("nvidia.dali")
    configs = [m.data_config for m in digit_pool]
    for root in (varied, digits_small):
        dataset = open_dataset(root)
        items = _items(dataset)
        dali = _load(dataset, items, configs, backend="dali", num_workers=2)
        torch_ = _load(dataset, items, configs, backend="torch")
        assert [b.samples.tolist() for b in dali] == [b.samples.tolist() for b in torch_]
        assert [b.views.tolist() for b in dali] == [b.views.tolist() for b in torch_]
        for index, config in enumerate(configs):
            grey = _grey_levels(_stack(dali, index), _stack(torch_, index), config)
            assert grey.mean() < MEAN_GREY, root
            assert grey[..., 1:-1, 1:-1].max() <= INTERIOR_MAX_GREY + 1e-3, root

    # What matters downstream: the models' outputs on the digits views.
    for index, member in enumerate(digit_pool):
        model = load_model(ModelSpec.parse(member.spec)).model
        with torch.inference_mode():
            a, b = model(_stack(dali, index)), model(_stack(torch_, index))
        torch.testing.assert_close(a, b, atol=LOGIT_ATOL, rtol=0)
        assert (a.argmax(1) == b.argmax(1)).float().mean() >= TOP1_AGREEMENT


@pytest.mark.parametrize("backend", ["torch", "dali", "nvjpeg"])
def test_images_do_not_depend_on_batching(varied: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    dataset = open_dataset(varied)
    items = _items(dataset)
    config = [
        {"input_size": [3, 24, 24], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    ]
    whole = _stack(_load(dataset, items, config, backend=backend, batch_size=64), 0)
    pieces = _stack(_load(dataset, items, config, backend=backend, batch_size=3, breaks=[5]), 0)
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("backend", ["torch", "dali", "nvjpeg"])
def test_bad_image_fails_or_is_skipped(digits_small: Path, tmp_path: Path, backend: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    config = [
        {
            "input_size": [3, 16, 16],
            "interpolation": "bilinear",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
    ]
    clean = open_dataset(digits_small)
    items = _items(clean)
    expected = _load(clean, items, config, backend=backend)

    root = Path(shutil.copytree(digits_small, tmp_path / "data"))
    broken = open_dataset(root)
    bad = 13
    path = broken.path(bad)
    path.write_bytes(path.read_bytes()[:80])  # header intact, pixels cut off
    with pytest.raises(BadImageError, match=rf"{path.name} \(sample {bad}\)"):
        _load(broken, items, config, backend=backend)

    batches = _load(broken, items, config, backend=backend, on_bad_image="skip")
    skipped = {s: why for b in batches for s, why in b.skipped.items()}
    assert list(skipped) == [bad] and "truncated" in skipped[bad]
    got = torch.cat([b.samples for b in batches])
    keep = items["samples"] != bad
    assert got.tolist() == items["samples"][keep].tolist()
    assert torch.equal(_stack(batches, 0), _stack(expected, 0)[torch.from_numpy(keep)])


# -- the nvjpeg backend: JPEGs decoded by torchvision, the rest by PIL in the workers -------------

# Configs that upscale and downscale with every interpolation; mean 0 and std 1/255, so the
# loaders' output is the image itself in grey levels. Nearest and lanczos must be PIL's exactly
# (nearest: PIL's own source pixels; lanczos: made by PIL in the workers).
PHOTO_CONFIGS = [
    {"input_size": [3, *size], "interpolation": interp, "mean": [0.0] * 3, "std": [1 / 255] * 3}
    for size, interp in [
        ((24, 24), "bilinear"),
        ((80, 64), "bicubic"),
        ((40, 50), "nearest"),
        ((32, 32), "lanczos"),
    ]
]
EXACT_INTERPOLATIONS = ("nearest", "lanczos")
# file name -> taken by the device decoder (``device_decodable``)
PHOTO_FILES = {
    "rgb.jpg": True,  # 4:2:0 chroma
    "progressive.jpg": True,
    "grey.jpg": True,
    "cmyk.jpg": False,  # 4 components: PIL's, by the rule's CMYK conversion
    "rgb-coded.jpg": False,  # components R, G, B (Adobe transform 0): not YCbCr
    "photo.png": False,
}


def _photo_file(image: Image.Image, name: str) -> bytes:
    """The photo piece as ``name`` says: JPEG quality 90 unless a PNG."""
    out = io.BytesIO()
    if name == "photo.png":
        image.save(out, "PNG")
    else:
        mode = {"grey.jpg": "L", "cmyk.jpg": "CMYK"}.get(name, "RGB")
        options = {"progressive.jpg": {"progressive": True}, "rgb-coded.jpg": {"keep_rgb": True}}
        image.convert(mode).save(out, "JPEG", quality=90, **options.get(name, {}))
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small pieces (96 x 72, 61 x 83) of scikit-learn's two sample photos in every form of
    ``PHOTO_FILES``, one class per photo."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos")
    for index, photo in enumerate(load_sample_images().images):
        folder = root / f"photo{index}"
        folder.mkdir()
        for piece, box in enumerate([(200, 100, 296, 172), (40, 300, 101, 383)]):
            image = Image.fromarray(photo).crop(box)
            for name in PHOTO_FILES:
                (folder / f"{piece}-{name}").write_bytes(_photo_file(image, name))
    return root


def _count_decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of JPEGs in each ``torchvision.io.decode_jpeg`` call from now on."""
    import torchvision.io

    calls: list[int] = []
    decode = torchvision.io.decode_jpeg

    def counted(encoded, *args, **kwargs):
        calls.append(len(encoded))
        return decode(encoded, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", counted)
    return calls


def test_nvjpeg_matches_torch_on_jpegs_and_the_rest(
    photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU device torchvision's libjpeg-turbo decodes as PIL's (0 levels measured), and the
    device resize is PIL's to 1 level (measured; bilinear and bicubic, border included), so the
    tolerances of DALI's agreement hold over the whole image; nearest and lanczos are exact."""
    dataset = open_dataset(photos)
    taken = [PHOTO_FILES[key.partition("-")[2]] for key in dataset.keys]
    assert [device_decodable(dataset.path(i).read_bytes()) for i in range(len(dataset))] == taken
    items = _items(dataset)
    torch_ = _load(dataset, items, PHOTO_CONFIGS, backend="torch")
    calls = _count_decode_calls(monkeypatch)
    nvjpeg = _load(dataset, items, PHOTO_CONFIGS, backend="nvjpeg")
    # One batched decode a batch, of exactly its JPEGs the device takes.
    decoded = [int(np.asarray(taken)[b.samples.numpy()].sum()) for b in nvjpeg]
    assert calls == decoded and all(decoded)
    assert [b.samples.tolist() for b in nvjpeg] == [b.samples.tolist() for b in torch_]
    assert [b.views.tolist() for b in nvjpeg] == [b.views.tolist() for b in torch_]
    assert [b.file_hashes.tolist() for b in nvjpeg] == [b.file_hashes.tolist() for b in torch_]
    for index, config in enumerate(PHOTO_CONFIGS):
        ours, theirs = _stack(nvjpeg, index), _stack(torch_, index)
        if config["interpolation"] in EXACT_INTERPOLATIONS:
            assert torch.equal(ours, theirs), config["interpolation"]
        grey = (ours - theirs).abs()  # std 1/255: grey levels
        assert grey.mean() < MEAN_GREY and grey.max() <= INTERIOR_MAX_GREY, config
        # The rule: a grey JPEG decodes as its grey in R, G and B.
        samples = torch.cat([b.samples for b in nvjpeg])
        grey_rows = [dataset.keys[s].endswith("grey.jpg") for s in samples.tolist()]
        grey_images = ours[torch.tensor(grey_rows)]
        assert torch.equal(grey_images[:, :1].expand_as(grey_images), grey_images)


def test_a_batch_mixing_jpegs_and_other_images_keeps_its_planned_order(photos: Path) -> None:
    """One batch, its items in a shuffled order: each row is the item the plan put there, equal
    (within the agreement's tolerance) to the torch backend's view of that item loaded alone."""
    dataset = open_dataset(photos)
    everything = _items(dataset, views=2)
    order = np.random.default_rng(3).permutation(len(everything["samples"]))
    items = {name: values[order] for name, values in everything.items()}
    kinds = {dataset.keys[s].rpartition(".")[2] for s in items["samples"]}
    assert kinds == {"jpg", "png"}
    (batch,) = _load(dataset, items, PHOTO_CONFIGS, backend="nvjpeg", batch_size=len(order))
    assert batch.samples.tolist() == items["samples"].tolist()
    assert batch.views.tolist() == items["views"].tolist()
    alone = _load(dataset, items, PHOTO_CONFIGS, backend="torch", batch_size=1)
    for index in range(len(PHOTO_CONFIGS)):
        grey = (batch.images[index] - _stack(alone, index)).abs()
        assert grey.mean() < MEAN_GREY and grey.max() <= INTERIOR_MAX_GREY, index


def _bogus_huffman_table(jpeg: bytes) -> bytes:
    """``jpeg`` with its first Huffman table's count of 16-bit codes set to 255: the file's
    structure is whole and its header reads, but no decoder can build the table."""
    count = jpeg.index(b"\xff\xc4") + 4 + 1 + 15  # marker, length, table class/id, counts 1..16
    return jpeg[:count] + b"\xff" + jpeg[count + 1 :]


@pytest.mark.parametrize("on_bad_image", ["skip", "fail"])
def test_a_jpeg_the_decoder_rejects_fails_alone(
    photos: Path, tmp_path: Path, on_bad_image: str
) -> None:
    """The batch's one decode call fails; the JPEGs are then decoded one by one, and the bad
    one, which PIL cannot decode either, is skipped (``skip``) or named (``fail``) as the torch
    backend skips or names it."""
    root = Path(shutil.copytree(photos, tmp_path / "data"))
    clean = open_dataset(photos)
    bad = clean.keys.index("photo1/0-rgb.jpg")
    path = root / clean.keys[bad]
    path.write_bytes(_bogus_huffman_table(path.read_bytes()))
    broken = open_dataset(root)
    assert broken.keys == clean.keys
    assert incomplete(path.read_bytes()) is None and not broken.read_sizes()[1]
    items = _items(broken, views=1)
    config = PHOTO_CONFIGS[:1]
    if on_bad_image == "fail":
        with pytest.raises(BadImageError) as by_torch:
            _load(broken, items, config, backend="torch", batch_size=64)
        with pytest.raises(BadImageError, match=rf"{path.name} \(sample {bad}\)") as by_nvjpeg:
            _load(broken, items, config, backend="nvjpeg", batch_size=64)
        assert str(by_nvjpeg.value) == str(by_torch.value)
        return
    (batch,) = _load(broken, items, config, backend="nvjpeg", batch_size=64, on_bad_image="skip")
    (by_torch,) = _load(broken, items, config, backend="torch", batch_size=64, on_bad_image="skip")
    assert list(batch.skipped) == [bad] and batch.skipped == by_torch.skipped
    keep = items["samples"] != bad
    assert batch.samples.tolist() == items["samples"][keep].tolist()
    (expected,) = _load(clean, items, config, backend="nvjpeg", batch_size=64)
    assert torch.equal(batch.images[0], expected.images[0][torch.from_numpy(keep)])


def test_auto_picks_nvjpeg_on_a_gpu_without_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    import fastkd.data.loader as loader

    monkeypatch.setattr(loader, "nvjpeg_unavailable", lambda device: None)
    monkeypatch.setattr(loader, "_has_dali", lambda: False)
    assert resolve_backend("auto", "cuda") == "nvjpeg"
    assert resolve_backend("auto", "cuda:1") == "nvjpeg"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto") == "torch"
    monkeypatch.setattr(loader, "nvjpeg_unavailable", lambda device: "nvJPEG")
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ConfigError, match=r"backend 'nvjpeg' needs nvJPEG; use the torch backend"):
        resolve_backend("nvjpeg", "cuda")
    monkeypatch.setattr(loader, "_has_dali", lambda: True)
    assert resolve_backend("auto", "cuda") == "dali"
    with pytest.raises(ConfigError, match=r"one of 'auto', 'dali', 'torch', 'nvjpeg', got 'pil'"):
        resolve_backend("pil")  # type: ignore[arg-type]


def test_nvjpeg_without_torchvision_decode_jpeg_is_refused(monkeypatch: pytest.MonkeyPatch):
    assert resolve_backend("nvjpeg", "cpu") == "nvjpeg"  # torchvision's CPU decoder
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # import fails
    with pytest.raises(ConfigError, match=r"needs torchvision\.io\.decode_jpeg, which cannot"):
        resolve_backend("nvjpeg", "cpu")


def test_default_workers_are_sized_to_the_cores_a_process_may_use(monkeypatch) -> None:
    from fastkd.data.loader import MAX_WORKERS, default_workers

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (default_workers(gpu), default_workers(cpu)) == (15, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on a 16-core node: 2 cores each
    assert (default_workers(gpu), default_workers(cpu)) == (1, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(256)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(gpu) == MAX_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert (default_workers(gpu), default_workers(cpu)) == (1, 1)


def test_dali_reads_checks_and_hashes_files_off_the_main_thread(
    varied: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DALI runs its plain source in the thread that drives the pipeline (and, on a GPU, the
    pool's forward): the files are read, checked and hashed in worker processes instead."""
    pytest.importorskip("nvidia.dali")
    import threading

    from fastkd.data import batches as common
    from fastkd.data import dali
    from fastkd.hashing import content_hash

    calls = tmp_path / "calls.txt"  # the workers are other processes: they append here

    def spied(name: str, function):
        def spy(*args, **kwargs):
            with calls.open("a") as out:
                main = threading.current_thread() is threading.main_thread()
                out.write(f"{name} {os.getpid()} {main}\n")
            return function(*args, **kwargs)

        return spy

    # each item's check (Items.checked_batch reads a batch's files at once, then checks each)
    monkeypatch.setattr(common, "check_encoded", spied("check", common.check_encoded))
    monkeypatch.setattr(dali, "content_hash", spied("hash", dali.content_hash))
    dataset = open_dataset(varied)
    items = _items(dataset)
    config = [{"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}]
    batches = _load(dataset, items, config, backend="dali", batch_size=4, num_workers=2)

    records = [line.split() for line in calls.read_text().splitlines()]
    assert sorted(name for name, _, _ in records) == ["check"] * 15 + ["hash"] * 15
    assert [r for r in records if r[1:] == [str(os.getpid()), "True"]] == []  # none here
    assert torch.cat([b.samples for b in batches]).tolist() == items["samples"].tolist()
    hashes = np.concatenate([b.file_hashes for b in batches])  # of the bytes the workers read
    files = [dataset.path(int(s)).read_bytes() for s in items["samples"]]
    assert hashes.tolist() == [content_hash(data) for data in files]


def test_a_jpeg_the_decoder_rejects_but_pil_reads_is_made_by_pil(
    photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the torch backend would: the row is PIL's view, exactly; the device's own failures
    (out of memory) are raised, never taken for a bad file."""
    import fastkd.data.nvjpeg as nvjpeg

    dataset = open_dataset(photos)
    target = dataset.keys.index("photo1/0-rgb.jpg")
    refused = dataset.path(target).read_bytes()
    decode = nvjpeg._decode_jpegs

    def pickier(encoded: list, device: torch.device) -> list:
        if any(t.numpy().tobytes() == refused for t in encoded):
            raise RuntimeError("decode_jpeg: this decoder does not take it")
        return decode(encoded, device)

    monkeypatch.setattr(nvjpeg, "_decode_jpegs", pickier)
    items = _items(dataset, views=1)
    configs = PHOTO_CONFIGS[:2]
    (batch,) = _load(dataset, items, configs, backend="nvjpeg", batch_size=64)
    (by_torch,) = _load(dataset, items, configs, backend="torch", batch_size=64)
    assert not batch.skipped and batch.samples.tolist() == by_torch.samples.tolist()
    row = batch.samples.tolist().index(target)
    for ours, theirs in zip(batch.images, by_torch.images, strict=True):
        assert torch.equal(ours[row], theirs[row])

    def out_of_memory(encoded: list, device: torch.device) -> list:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(nvjpeg, "_decode_jpegs", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        _load(dataset, items, configs, backend="nvjpeg", batch_size=64, on_bad_image="skip")

    def wrapped(encoded: list, device: torch.device) -> list:  # as torchvision's GPU path says it
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory (2.00 GiB)")

    monkeypatch.setattr(nvjpeg, "_decode_jpegs", wrapped)
    with pytest.raises(RuntimeError, match="Error while decoding JPEG images: CUDA out of"):
        _load(dataset, items, configs, backend="nvjpeg", batch_size=64, on_bad_image="skip")
