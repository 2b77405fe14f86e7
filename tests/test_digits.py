"""The embedded digits data set: real data, fixed stratified splits, an ImageFolder on disk."""

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from fastkd.digits import SPLITS, split_indices, write_digits_folder


def test_splits_partition_every_sample_once_and_are_stratified():
    labels = load_digits().target
    parts = split_indices(labels)
    joined = np.concatenate([parts[s] for s in SPLITS])
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    for cls in range(10):
        share = (labels[parts["train"]] == cls).mean()
        assert abs(share - (labels == cls).mean()) < 0.01
    assert np.array_equal(split_indices(labels)["test"], parts["test"])


def test_folder_holds_the_real_pixels(tmp_path):
    root = write_digits_folder(tmp_path / "digits", image_size=8)
    digits = load_digits()
    index = int(split_indices(digits.target)["val"][0])
    label = int(digits.target[index])
    image = np.asarray(Image.open(root / "val" / str(label) / f"{index:04d}.png"))
    assert image.shape == (8, 8, 3)
    # At the native 8x8 size the resize is the identity: the pixels are the data set's.
    expected = np.clip(digits.images[index] / 16.0 * 255.0, 0, 255).astype(np.uint8)
    assert np.array_equal(image[..., 0], expected)
    counts = {s: len(list((root / s).rglob("*.png"))) for s in SPLITS}
    assert sum(counts.values()) == len(digits.target)


def test_an_unfinished_folder_is_rebuilt(tmp_path):
    root = write_digits_folder(tmp_path / "d", image_size=8)
    (root / ".fastkd-digits").unlink()
    victim = next((root / "train").rglob("*.png"))
    victim.write_bytes(b"truncated")
    write_digits_folder(root, image_size=8)
    assert Image.open(victim).size == (8, 8)
