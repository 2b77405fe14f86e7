"""Dump benchmark: images/s of the DALI and torch paths in one run, and bytes per stored view.

Two workloads, each through both backends on the same items and data configs:

- ``digits``: the embedded digits (train split, 1,078 32 px PNGs) upscaled to the pool's inputs;
  the loader alone, then the whole ``fastkd dump`` (loader + every model + store writes). Bytes
  per stored view per model come from the DALI run's store (``fastkd.store.summarize``).
- ``photos``: a SYNTHETIC folder of ImageNet-sized JPEGs (smooth random colour fields, 500x375
  and similar, quality 90), preprocessed to 224 px: the loader alone, since on a CPU the forward
  pass of any 224 px model would hide the loader.

The pool is random-init timm models saved as fastkd checkpoints (speed does not depend on the
weights; no pretrained weights can be downloaded here), unless ``--model NAME=CKPT`` is given. A
view is one decoded image; images/s counts views, samples/s = images/s / views.

Run: ``python -m fastkd.bench.dump`` (or ``main([...])``); results go to
``bench/results/dump-cpu.json`` (``dump-gpu.json`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from fastkd.augment import AugmentConfig
from fastkd.bench.imagenet import IMAGENET_224
from fastkd.checkpoints import save_checkpoint
from fastkd.data import ImageDataset, open_dataset, resolve_backend, view_loader
from fastkd.digits import write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.models import ModelSpec, load_model
from fastkd.runtime import machine_name, resolve_device
from fastkd.store import summarize
from fastkd.views import all_views

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("dali", "torch")
# Random-init digits pool: two input sizes, interpolations and normalisations.
DIGITS_POOL = {
    "convnext": ("test_convnext", 64, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "effnet": ("test_efficientnet", 48, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
PHOTO_SIZES = ((375, 500), (500, 375), (333, 500), (500, 500), (400, 600))


def write_pool(folder: Path, num_classes: int) -> list[str]:
    """Random-init DIGITS_POOL members as fastkd checkpoints; their ``--model`` specs."""
    specs = []
    for name, (arch, size, interpolation, mean, std) in DIGITS_POOL.items():
        torch.manual_seed(0)
        model = timm.create_model(arch, num_classes=num_classes)
        config = {
            "input_size": [3, size, size],
            "interpolation": interpolation,
            "mean": list(mean),
            "std": list(std),
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
        path = save_checkpoint(
            folder / f"{name}.pt", model, arch, {"num_classes": num_classes}, config
        )
        specs.append(f"{arch}={path}")
    return specs


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """SYNTHETIC ImageNet-sized JPEGs: bicubic-upsampled random colour fields, 10 classes."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        height, width = PHOTO_SIZES[index % len(PHOTO_SIZES)]
        folder = root / f"class{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        image.save(folder / f"{index:05d}.jpg", quality=90)
    return root


def dataset_views(dataset: ImageDataset, views: int, seed: int) -> dict[str, np.ndarray]:
    return all_views(seed, np.arange(len(dataset)), views, dataset.sizes, AugmentConfig())


def loader_rate(
    dataset: ImageDataset,
    items: dict[str, np.ndarray],
    configs: list[dict],
    backend: str,
    batch_size: int,
    workers: int,
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    """Best of ``repeats`` passes of the loader alone (first batch to last, startup included)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        count = 0
        for batch in view_loader(
            dataset,
            items["samples"],
            items["views"],
            items["boxes"],
            items["flips"],
            configs,
            batch_size=batch_size,
            backend=backend,
            num_workers=workers,
            device=device,
        ):
            count += len(batch.samples)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"seconds": round(best, 3), "images_per_s": round(count / best, 1)}


def dump_rate(cfg: DumpConfig, num_views: int) -> dict[str, float]:
    """The whole dump, model loading and store creation included."""
    start = time.perf_counter()
    run_dump(cfg)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "images_per_s": round(num_views / seconds, 1)}


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=4, help="views per sample")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DALI threads / DataLoader processes",
    )
    parser.add_argument("--photos", type=int, default=256, help="synthetic 224 px images (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="loader passes; the best is kept")
    parser.add_argument(
        "--model", action="append", default=None, help="NAME=CKPT (default: a random-init pool)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = resolve_device()
    backends = [b for b in BACKENDS if b == "torch" or resolve_backend("auto") == "dali"]
    out = args.out or RESULTS / f"dump-{'gpu' if device.type == 'cuda' else 'cpu'}.json"

    with tempfile.TemporaryDirectory(prefix="fastkd-bench-dump-") as tmp:
        tmp = Path(tmp)
        digits = write_digits_folder(tmp / "digits") / "train"
        dataset = open_dataset(digits)
        specs = args.model or write_pool(tmp, dataset.num_classes)
        configs = [load_model(ModelSpec.parse(spec)).data_config for spec in specs]
        items = dataset_views(dataset, args.views, seed=0)
        result: dict[str, Any] = {
            "machine": machine_name(device),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # a shared machine?
            "settings": {
                "views": args.views,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "device": str(device),
                "pool": specs if args.model else list(DIGITS_POOL),
                "weights": "given checkpoints" if args.model else "random init",
            },
            "digits": {"samples": len(dataset), "views": len(items["samples"])},
        }
        stores = {}
        for backend in backends:
            stores[backend] = tmp / f"store-{backend}"
            cfg = DumpConfig(
                data=digits,
                models=specs,
                out=stores[backend],
                views=args.views,
                topk=10,
                batch_size=args.batch_size,
                backend=backend,
                num_workers=args.workers,
                device=str(device),
                progress=False,
            )
            result["digits"][backend] = {
                "loader": loader_rate(
                    dataset,
                    items,
                    configs,
                    backend,
                    args.batch_size,
                    args.workers,
                    device,
                    args.repeats,
                ),
                "dump": dump_rate(cfg, len(items["samples"])),
            }
        summary = summarize(stores[backends[0]])
        result["digits"]["bytes_per_view"] = {
            entry.name: round(summary.bytes_per_view(entry.name), 2)
            for entry in summary.manifest.models
        }
        result["digits"]["bytes_per_view"]["shared"] = round(summary.bytes_per_view(None), 2)

        if args.photos:
            photos = open_dataset(write_photos(tmp / "photos", args.photos))
            photo_items = dataset_views(photos, args.views, seed=0)
            result["photos_224"] = {
                "note": "SYNTHETIC JPEGs (random colour fields), sizes " + str(PHOTO_SIZES),
                "samples": len(photos),
                "views": len(photo_items["samples"]),
            }
            for backend in backends:
                result["photos_224"][backend] = {
                    "loader": loader_rate(
                        photos,
                        photo_items,
                        [IMAGENET_224],
                        backend,
                        args.batch_size,
                        args.workers,
                        device,
                        args.repeats,
                    ),
                }

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
