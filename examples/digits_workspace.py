"""A small workspace to try fastkd on: real images and a pool of two models that know different
things. The README's "Using it on your data" runs on it, as its test does.

    python examples/digits_workspace.py work

writes (in under a minute on 2 CPU cores):
- work/digits/{train,val,test}/<digit>/<id>.png: scikit-learn's digits at 16 px;
- work/shards/train-00000{0..3}.tar: the training images again as WebDataset shards
  (<key>.png and <key>.cls, the class index as text);
- work/pool/{resnet,vit}.pt: two timm models trained from scratch with cross-entropy, each on
  every image of its own six digits and a third of the others (the demo's pool), so each is
  right where the other is wrong; fastkd checkpoints, with their data configs.
"""

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config

from fastkd.checkpoints import save_checkpoint
from fastkd.digits import (
    DIGITS_POOL,
    POOL_IMAGE_SIZE,
    digits_labels,
    sample_of,
    write_digits_folder,
)

SHARDS = 4


def write_shards(folder: Path, out: Path, shards: int) -> None:
    """An image folder's files as WebDataset tar shards: member ``<class>/<id>.png`` and its
    ``<class>/<id>.cls``, images spread over the shards in turn."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*/*.png"))
    for shard in range(shards):
        with tarfile.open(out / f"train-{shard:06d}.tar", "w") as tar:
            for path in files[shard::shards]:
                key = path.relative_to(folder).with_suffix("").as_posix()
                tar.add(path, arcname=f"{key}.png")
                label = str(int(path.parent.name)).encode()
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))


def train_pool(work: Path, epochs: int) -> None:
    """Each member from scratch on its part of the training split
    (``PoolMember.pretraining_samples``): Adam, cross-entropy, the whole images in memory."""
    folder, labels = work / "digits" / "train", digits_labels()
    part_of = {
        sample_of(f"train/{p.relative_to(folder).as_posix()}"): p for p in folder.glob("*/*.png")
    }
    (work / "pool").mkdir(exist_ok=True)
    for member in DIGITS_POOL[:2]:  # the ResNet and the ViT
        samples = member.pretraining_samples(np.fromiter(part_of, np.int64), labels, seed=0)
        torch.manual_seed(0)
        model = timm.create_model(member.arch, num_classes=10, **member.model_kwargs)
        config = resolve_model_data_config(model)
        mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        images = torch.stack(
            [torch.from_numpy(np.array(Image.open(part_of[s]).convert("RGB"))) for s in samples]
        ).permute(0, 3, 1, 2)
        images, targets = (images / 255 - mean) / std, torch.from_numpy(labels[samples])
        optimizer = torch.optim.Adam(model.parameters(), lr=member.lr)
        for _ in range(epochs):
            for batch in torch.randperm(len(samples)).split(member.batch_size):
                loss = torch.nn.functional.cross_entropy(model(images[batch]), targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        kwargs = {"num_classes": 10, **member.model_kwargs}
        save_checkpoint(
            work / "pool" / f"{member.name}.pt", model.eval(), member.arch, kwargs, config
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="the workspace folder (made if missing)")
    parser.add_argument("--epochs", type=int, default=8, help="each member's training epochs")
    args = parser.parse_args()
    write_digits_folder(args.work / "digits", image_size=POOL_IMAGE_SIZE)
    write_shards(args.work / "digits" / "train", args.work / "shards", SHARDS)
    train_pool(args.work, args.epochs)
    print(f"workspace ready: {args.work}")
