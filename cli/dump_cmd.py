"""`fastkd dump`: parse the options into a ``DumpConfig`` and call ``fastkd.dump.run_dump``."""

from __future__ import annotations

from typing import Annotated

import typer

from fastkd.augment import AugmentConfig
from fastkd.choices import OnBadImage
from fastkd.cli import options
from fastkd.cli.augment_options import with_view_options
from fastkd.cli.guard import guarded
from fastkd.compression import DEFAULT_TAIL, MAX_TAIL_SAMPLES, TailModel


def dump(
    data: Annotated[
        str,
        typer.Option(
            help=f"The images: {options.DATA_FORMS}.",
            show_default=False,
        ),
    ],
    model: Annotated[
        list[str],
        typer.Option(
            metavar="[ALIAS:]NAME[=CKPT]",
            help="A pool member: a timm model name (pretrained weights, needs the network), or "
            "with =CKPT a local checkpoint (fastkd, timm or plain state dict). ALIAS: names it in "
            "the store (default: the checkpoint's stem, else the model name). Repeat per model.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="The store to create, or to resume: a directory, or a prefix on S3-compatible "
            "object storage (s3://bucket/prefix/store.zarr; credentials and endpoint as for "
            "the AWS CLI, or --storage-option).",
            show_default=False,
        ),
    ],
    views: Annotated[
        int,
        typer.Option(
            min=1, help="Views stored per sample (count); view 0 is the eval (centre) view."
        ),
    ] = 8,
    topk: Annotated[
        int,
        typer.Option(
            min=0,
            help="Classes stored per view and model (their ids and log-probabilities), beside "
            "the exact label log-probability and the tail's mass. 0 stores every class; so do "
            "few classes (<= 128) unless --tail is given.",
        ),
    ] = 10,
    tail: Annotated[
        TailModel | None,
        typer.Option(
            help="How training reads the classes outside the top-k: 'uniform' (shared equally), "
            "'bucket' (one bucket, the student's shape inside it left free) or 'sampled' "
            f"(--tail-samples ids drawn from the tail). Default: {DEFAULT_TAIL.value}, the "
            "lowest worst-case gradient error over confident, high-entropy, label-smoothed and "
            "real rows (docs/store-format.md). Naming one stores sparse targets even for few "
            "classes.",
            show_default=False,
        ),
    ] = None,
    tail_samples: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_TAIL_SAMPLES,
            help="Class ids drawn from the tail per view, for --tail sampled (default 8, at most "
            f"{MAX_TAIL_SAMPLES}).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the view replay (crops, flips); any integer >= 0.")
    ] = 0,
    batch_size: Annotated[
        int,
        typer.Option(min=1, help="Views per forward pass of each model, per process (GPU)."),
    ] = 256,
    backend: options.LoaderBackend = "auto",
    device: options.Device = "auto",
    part: Annotated[
        str | None,
        typer.Option(
            "--part",
            "--shard",
            metavar="I/N",
            help="This process's part I/N of the store's blocks: it writes only blocks b with "
            "b % N == I, so N ranks fill one store together (default: torchrun's "
            "RANK/WORLD_SIZE, else 0/1). --shard is the old name.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an existing store made with another configuration (it is refused "
            "otherwise; a store with the same configuration is always resumed)."
        ),
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            help="Check this part's written blocks (every block without --part) against the "
            "content hashes recorded when they were written, and re-read their image files: "
            "rewrite exactly the blocks that are damaged (a deleted, truncated or altered shard "
            "file; `fastkd inspect --verify` lists them) or were made from files changed since.",
        ),
    ] = False,
    on_bad_image: Annotated[
        OnBadImage,
        typer.Option(
            help="An image that cannot be read: fail (stop, naming it; all written blocks are "
            "kept) or skip (flag it in the store and carry on)."
        ),
    ] = "fail",
    samples_per_shard: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Samples per store shard, the unit of writing and of resume (default: the "
            "largest power of two at most 8192 / --views, about 8192 views).",
            show_default=False,
        ),
    ] = None,
    write_queue: Annotated[
        int,
        typer.Option(
            help="Blocks (count) waiting for the writer thread, which encodes and writes each "
            "finished block while the next ones are inferred; each holds its logits in memory. "
            "0 writes each block before inferring the next (no overlap).",
        ),
    ] = 2,
    input_size: options.InputSize = None,
    workers: options.Workers = None,
    root: options.DataRoot = None,
    progress: options.ShowProgress = True,
    storage_option: options.StorageOption = None,
    *,
    augment: AugmentConfig,  # the view options (augment_options.with_view_options)
) -> None:
    """Run every model of the pool over every (sample, view) of a data set, once, and store its
    soft targets (top-k log-probabilities, the tail's mass, the label's exact log-probability) in
    a compressed Zarr store.

    A killed dump resumes where it stopped when run again with the same options.
    """
    from fastkd.storage import configure

    configure(storage_option, data, out)  # first: every s3:// URL of the command uses them
    from fastkd.dump import DumpConfig, run_dump

    config = DumpConfig(
        data=data,
        models=model,
        out=out,
        views=views,
        topk=topk,
        tail=tail.value if tail is not None else None,
        tail_samples=tail_samples,
        seed=seed,
        augment=augment,
        batch_size=batch_size,
        backend=backend,
        device=device,
        part=part,
        overwrite=overwrite,
        repair=repair,
        on_bad_image=on_bad_image,
        samples_per_shard=samples_per_shard,
        write_queue=write_queue,
        input_size=input_size,
        num_workers=workers,
        data_root=root,
        progress=progress,
    )
    run_dump(config)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("dump")(guarded(with_view_options(dump)))
