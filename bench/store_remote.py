"""The store benchmark's remote case: random reads of stored targets from an S3 server.

The same synthetic store (``fastkd.bench.store.build_store``) is written to local disk and to a
bucket; a fresh reader then reads a shuffled epoch of (sample, view) rows from each, as training
does, with 1, 8 and 32 block reads in flight for the remote one (``--storage-option
concurrency=N``). The cold epoch is what object storage costs: every block is fetched and
decoded once, later epochs read the in-memory block cache either way. ``moto`` starts moto's
S3 server on 127.0.0.1 in a process of its own (a Python server: its requests/s are the ceiling
here, and it shares the machine's cores with the reader); an ``s3://`` URL uses a real server,
reached by the standard AWS environment variables.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastkd.bench.store import build_store
from fastkd.errors import ConfigError
from fastkd.storage import as_location
from fastkd.store import StoreReader
from fastkd.views import epoch_order, epoch_views

CONCURRENCY = (1, 8, 32)


@contextlib.contextmanager
def s3_prefix(remote: str) -> Iterator[tuple[str, dict[str, str], str]]:
    """(an empty s3:// prefix, its storage options, what serves it)."""
    if remote != "moto":
        if not remote.startswith("s3://"):
            raise ConfigError(f"--remote takes 'moto' or an s3:// URL, got {remote!r}")
        yield f"{remote.rstrip('/')}/fastkd-bench-{uuid.uuid4().hex[:8]}", {}, "the given server"
        return
    try:
        import boto3
        import moto.server  # noqa: F401  (the server's package, run below as a process)
    except ImportError:
        raise ConfigError("--remote moto needs moto's server: pip install 'moto[server]'") from None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"access_key_id": "bench", "secret_access_key": "bench", "region": "us-east-1"}
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket="fastkd-bench")
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield "s3://fastkd-bench/store", {"endpoint": endpoint, **keys}, "moto (own process)"
    finally:
        server.terminate()
        server.wait(timeout=30)


def cold_epoch(reader: StoreReader, model: str, batch: int, seed: int) -> dict:
    """Views/s of a fresh reader's first shuffled epoch (every block fetched and decoded once)."""
    n = reader.num_samples
    order = epoch_order(seed, 0, n)
    views = epoch_views(seed, 0, order, reader.num_views)
    start = time.perf_counter()
    for lo in range(0, n, batch):
        reader.read(model, order[lo : lo + batch], views[lo : lo + batch])
    seconds = time.perf_counter() - start
    return {
        "views_per_s": round(n / seconds),
        "seconds": round(seconds, 3),
        "blocks_decoded": reader.blocks_decoded,
    }


def remote_reads(
    remote: str, samples: int, views: int, classes: int, noise: float, batch: int, seed: int,
    repeats: int = 3,
) -> dict:  # fmt: skip
    """The remote case's figures: local disk, then the server at each concurrency (medians)."""
    model = "top10"
    workdir = Path(tempfile.mkdtemp(prefix="fastkd-bench-store-remote-"))
    try:
        local = workdir / "store"
        build_store(local, samples, views, classes, [10], noise, seed)
        local_runs = [cold_epoch(StoreReader(local), model, batch, seed) for _ in range(repeats)]
        with s3_prefix(remote) as (url, options, server):
            write_s = build_store(
                as_location(url, options), samples, views, classes, [10], noise, seed
            )
            by_concurrency = {}
            for concurrency in CONCURRENCY:
                location = as_location(url, {**options, "concurrency": concurrency})
                runs = [
                    cold_epoch(StoreReader(location), model, batch, seed) for _ in range(repeats)
                ]
                by_concurrency[str(concurrency)] = _median(runs)
            with contextlib.suppress(Exception):
                as_location(url, options).delete_below()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    local_figure = _median(local_runs)
    for figure in by_concurrency.values():
        figure["ratio_to_local_disk"] = round(
            figure["views_per_s"] / local_figure["views_per_s"], 3
        )
    return {
        "server": server,
        "model": model,
        "write_seconds_remote": round(write_s, 2),
        "local_disk": local_figure,
        "remote_by_concurrency": by_concurrency,
    }


def _median(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["views_per_s"])
    return {**ordered[len(ordered) // 2], "runs_views_per_s": [r["views_per_s"] for r in runs]}
