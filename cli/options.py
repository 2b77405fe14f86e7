"""The options several commands share (where and how they run), defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastkd.choices import Backend

# What a data option takes (fastkd.data.open_dataset), for the help of each.
DATA_FORMS = (
    "an image folder (one subfolder per class), a file list with a 'relative/path label' line "
    "per image, or WebDataset tar shards: a .tar or a brace pattern such as "
    "'shards/train-{000000..000127}.tar', local or on object storage "
    "('s3://bucket/train-{000000..000127}.tar', see --storage-option; per key an image member "
    "and a .cls member holding the class index); a label is a class index in plain ASCII digits, below 16,777,216 (2^24)"
)

StorageOption = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        metavar="KEY=VALUE",
        help="For s3:// stores and shards, beside the standard AWS environment variables "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL "
        "for MinIO, Ceph, R2...): any obstore S3 or client setting (endpoint, region, profile, "
        "skip_signature, timeout...), max_retries, retry_timeout (s) or concurrency; repeat it "
        "for several. Secrets given here are never printed. Without it: the environment's "
        "settings alone.",
        show_default=False,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        help="Torch device: auto (this rank's GPU when there is one, else the CPU), cpu, cuda "
        "or cuda:N."
    ),
]
LoaderBackend = Annotated[
    Backend,
    typer.Option(
        help="Image pipeline: dali (NVIDIA DALI); nvjpeg (JPEGs decoded on the GPU by "
        "torchvision's nvJPEG, other images by PIL in DataLoader workers; on the CPU, "
        "torchvision's decoder); torch (DataLoader + PIL); auto = DALI when installed, else "
        "nvjpeg on a GPU, else torch."
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Loader workers per process: DALI threads (with one process per 8 reading and "
        "hashing the files ahead) or DataLoader processes (default: on a "
        "GPU, the cores this process may use, shared among a node's torchrun ranks, less one, "
        "at most 32; on CPU those cores, at most 8).",
        show_default=False,
    ),
]
DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        "--root",
        help="Folder the paths of a file list are relative to (default: the list's folder).",
        show_default=False,
    ),
]
ShowProgress = Annotated[
    bool,
    typer.Option(help="Progress bars, on a terminal (the log lines are written either way)."),
]
InputSize = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Every model's input side, in pixels (square), instead of its data config's "
        "(default: each model's own, e.g. 224 for ImageNet models; small images such as 32 px "
        "are upscaled to it).",
        show_default=False,
    ),
]
