"""Object storage for stores: obstore or fsspec/s3fs, by random-read throughput and robustness.

Issue 27 asks which of zarr v3's object-storage stores fastkd should use. This benchmark writes
one model array pair laid out as ``fastkd.store.arrays`` lays it out (top-k fp16 log-probabilities
and int16 ids, ``[sample, view, k]``, sharded along the sample axis with the default
``StoreLayout``, blosc-zstd, views innermost) and reads it the way the reader does: whole blocks
(one shard of each array, decoded; ``block_cache`` / ``integrity.read_block``), at random, with 1,
8 and 32 blocks in flight, through

- ``zarr.storage.ObjectStore`` over obstore's ``S3Store`` (made by ``fastkd.storage.clients``,
  with fastkd's retry settings),
- ``zarr.storage.FsspecStore`` over ``s3fs.S3FileSystem(asynchronous=True)``,
- ``zarr.storage.LocalStore`` on local disk (files in the OS page cache), as the ceiling.

The S3 server is the tests' (``tests/s3_server.py``: moto on 127.0.0.1 behind a fault-injecting
proxy); throughput is measured against moto directly, robustness through the proxy. moto is a
Python server sharing this machine's cores with the client, so the figures compare the clients
against one local server; they are not what either reaches against AWS S3 or MinIO. Without the
repository's ``tests`` folder (an installed package) the benchmark starts plain moto and skips
the fault checks.

Robustness, per S3 backend: a block read with 5 x 503 and with 3 dropped connections on its GET,
a block write with 3 x 503 on its PUT (values compared after), the error a persistent fault
(100 x 503) gives and whether it names the object, and create-if-absent (a conditional PUT,
``If-None-Match: *``), which the store writer's claims need.

Run: ``python -m fastkd.bench.object_store_choice --out bench/results/object-store-choice-cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "object-store-choice-cpu.json"
TESTS = Path(__file__).resolve().parent.parent / "tests"
ARRAYS = ("topk_logprobs", "topk_ids")
PREFIX = "store/models/m"
ACCESS_KEY, SECRET_KEY, REGION = "fastkd-bench-key", "fastkd-bench-secret", "us-east-1"


# ----------------------------------------------------------------------------------------------
# The server


class _PlainMoto:
    """moto alone, where the tests' fault proxy is not at hand: no fault checks."""

    faults = None

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.moto_endpoint = self.endpoint = f"http://{host}:{port}"

    def new_bucket(self) -> str:
        import boto3

        name = f"fastkd-bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=self.moto_endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        ).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._moto.stop()


def start_server() -> Any:
    """The tests' S3 server (moto behind the fault proxy) if the repository's tests are here,
    else plain moto."""
    if (TESTS / "s3_server.py").is_file():
        sys.path.insert(0, str(TESTS))
        try:
            from s3_server import S3Server
        finally:
            sys.path.remove(str(TESTS))
        return S3Server()
    return _PlainMoto()


def credentials() -> tuple[str, str]:
    """The server's credentials (moto takes any; the tests' server names its own)."""
    if (TESTS / "s3_server.py").is_file():
        import s3_server

        return s3_server.ACCESS_KEY, s3_server.SECRET_KEY
    return ACCESS_KEY, SECRET_KEY


# ----------------------------------------------------------------------------------------------
# The stores


def obstore_store(
    endpoint: str, bucket: str, prefix: str, read_only: bool, fast_retry: bool = False
):
    """zarr's ObjectStore over the obstore client fastkd makes (``fastkd.storage.clients``), with
    fastkd's retry settings (``fast_retry``: the same number of retries, backoff 10-100 ms)."""
    from zarr.storage import ObjectStore

    from fastkd.storage.clients import prefixed_client
    from fastkd.storage.options import StorageOptions

    key, secret = credentials()
    values = {
        "endpoint": endpoint,
        "access_key_id": key,
        "secret_access_key": secret,
        "region": REGION,
        "allow_http": "true",
    }
    if fast_retry:
        values |= {"init_backoff": "0.01", "max_backoff": "0.1"}
    options = StorageOptions.parse(values)
    return ObjectStore(prefixed_client("s3", bucket, prefix, options), read_only=read_only)


def fsspec_store(
    endpoint: str, bucket: str, prefix: str, read_only: bool, one_request: bool = False
):
    """zarr's FsspecStore over an asynchronous s3fs file system, with s3fs's and botocore's
    default retries and a connection pool of 64 (botocore's default, 10, would cap the
    32-request case). s3fs reads a whole object with a HEAD first (its size decides whether to
    split the GET); ``one_request`` (``max_concurrency=1``) makes it one GET, as obstore's."""
    import s3fs
    from zarr.storage import FsspecStore

    key, secret = credentials()
    fs = s3fs.S3FileSystem(
        key=key,
        secret=secret,
        endpoint_url=endpoint,
        client_kwargs={"region_name": REGION},
        config_kwargs={"max_pool_connections": 64},
        max_concurrency=1 if one_request else 10,  # 10: s3fs's default
        asynchronous=True,
        skip_instance_cache=True,
    )
    _file_systems.append(fs)
    return FsspecStore(fs, path=f"{bucket}/{prefix}", read_only=read_only)


_file_systems: list[Any] = []


def close_file_systems() -> None:
    """Close the s3fs clients' sessions (aiohttp warns of each one left open)."""
    while _file_systems:
        client = getattr(_file_systems.pop(), "_s3", None)
        if client is not None:
            run(client.close())


def local_store(root: Path, read_only: bool):
    from zarr.storage import LocalStore

    return LocalStore(root, read_only=read_only)


# ----------------------------------------------------------------------------------------------
# The data


def make_values(
    samples: int, views: int, topk: int, classes: int, seed: int
) -> dict[str, np.ndarray]:
    """Top-k log-probabilities (sorted, negative, fp16) and class ids (int16) that look like a
    classifier's: the views of one sample share most of their ids."""
    rng = np.random.default_rng(seed)
    base = np.argsort(rng.random((samples, classes)), axis=1)[:, : topk + 2].astype(np.int16)
    ids = np.repeat(base[:, None, :topk], views, axis=1)
    swap = rng.random((samples, views, topk)) < 0.2
    ids[swap] = np.broadcast_to(base[:, None, topk : topk + 1], ids.shape)[swap]
    logprobs = -np.sort(rng.exponential(1.5, (samples, views, topk)), axis=2)
    return {"topk_logprobs": logprobs.astype(np.float16), "topk_ids": ids}


def create_arrays(store: Any, values: dict[str, np.ndarray], layout: Any) -> None:
    """The arrays as a fastkd store's model arrays (``_create_sharded``), values written."""
    import zarr

    from fastkd.store.arrays import _create_sharded

    group = zarr.open_group(store, mode="a", zarr_format=3)
    for name, data in values.items():
        array = _create_sharded(group, name, data.shape, data.dtype, layout, views_innermost=True)
        array[:] = data


def open_arrays(store: Any) -> list[Any]:
    import zarr

    group = zarr.open_group(store, mode="r", zarr_format=3)
    return [group[name]._async_array for name in ARRAYS]


# ----------------------------------------------------------------------------------------------
# Throughput


def run(coro: Any) -> Any:
    """``coro`` on zarr's event loop (where the stores' async clients live)."""
    from zarr.core.sync import sync

    return sync(coro)


async def read_blocks(arrays: list[Any], blocks: list[int], block: int, concurrency: int) -> list:
    """Decode each of ``blocks`` whole (every array's shard), ``concurrency`` blocks in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(b: int) -> list:
        async with gate:
            return [await a.getitem(slice(b * block, (b + 1) * block)) for a in arrays]

    return await asyncio.gather(*(one(b) for b in blocks))


def throughput(
    arrays: list[Any],
    num_blocks: int,
    block: int,
    views: int,
    stored_bytes: np.ndarray,
    concurrency: int,
    reads: int,
    repeats: int,
    seed: int,
) -> dict:
    """Median views/s and MB/s (stored, decoded) of ``reads`` random block reads, ``repeats``
    times; the random blocks are the same for every backend."""
    run(read_blocks(arrays, [0], block, 1))  # metadata and clients warm
    rates = []
    for rep in range(repeats):
        chosen = np.random.default_rng([seed, concurrency, rep]).integers(0, num_blocks, reads)
        start = time.perf_counter()
        run(read_blocks(arrays, chosen.tolist(), block, concurrency))
        seconds = time.perf_counter() - start
        rates.append((reads / seconds, float(stored_bytes[chosen].sum()) / seconds))
    blocks_per_s = statistics.median(r[0] for r in rates)
    return {
        "blocks_per_s": round(blocks_per_s, 1),
        "views_per_s": round(blocks_per_s * block * views),
        "stored_MB_per_s": round(statistics.median(r[1] for r in rates) / 1e6, 2),
        "views_per_s_each_repeat": [round(r[0] * block * views) for r in rates],
    }


# ----------------------------------------------------------------------------------------------
# Robustness


@contextlib.contextmanager
def proxy_hook(server: Any, match: str = "", delay_s: float = 0.0) -> Iterator[list[str]]:
    """While inside: the methods of the proxied requests whose path contains ``match``, and
    ``delay_s`` added before each request is answered (a network's latency: the proxy answers
    each request in its own thread, so delays overlap as they would)."""
    methods: list[str] = []
    take = server.faults.take

    def hooked(method: str, path: str) -> Any:
        if match in path:
            methods.append(method)
        if delay_s:
            time.sleep(delay_s)
        return take(method, path)

    server.faults.take = hooked
    try:
        yield methods
    finally:
        server.faults.take = take


def shard_key(name: str, block: int) -> str:
    return f"{name}/c/{block}/0/0"


def _attempt(server: Any, call: Callable[[], Any]) -> dict:
    """Run ``call``; what it returned or raised, the requests it made and the faults it met."""
    faults = server.faults
    requests, injected = faults.requests, faults.injected
    start = time.perf_counter()
    try:
        value, error = call(), None
    except Exception as caught:  # what each backend raises is the finding
        value, error = None, caught
    out = {
        "seconds": round(time.perf_counter() - start, 2),
        "requests": faults.requests - requests,
        "faults_met": faults.injected - injected,
    }
    faults.clear()
    return out | {"value": value, "error": error}


def _error_text(error: BaseException, key: str) -> dict:
    text = " ".join(str(error).split())
    return {
        "type": f"{type(error).__module__}.{type(error).__name__}",
        "message": text[:400],
        "names_object": key in text,
    }


def robustness(server: Any, bucket: str, backend: str, values: dict, layout: Any) -> dict:
    """The fault checks for one backend, through the fault proxy."""
    make = {"obstore": obstore_store, "fsspec": fsspec_store}[backend]
    block = layout.samples_per_shard
    b = 1
    rows = slice(b * block, (b + 1) * block)
    truth = [values[name][rows] for name in ARRAYS]
    key = shard_key(ARRAYS[0], b)
    out: dict[str, Any] = {}

    def read(arrays: list[Any]) -> Callable[[], list]:
        return lambda: run(read_blocks(arrays, [b], block, 1))[0]

    def equal(got: Any) -> bool:
        return got is not None and all(
            np.array_equal(g, t) for g, t in zip(got, truth, strict=True)
        )

    arrays = open_arrays(make(server.endpoint, bucket, PREFIX, True))
    with proxy_hook(server) as methods:
        clean = _attempt(server, read(arrays))
    out["clean_read"] = {"requests": methods, "values_equal": equal(clean["value"])}
    for case, (count, kind) in {"get_5x503": (5, 503), "get_3x_dropped": (3, "drop")}.items():
        server.faults.fail(count, kind, method="GET", path=key)
        got = _attempt(server, read(arrays))
        out[case] = {
            "succeeded": got["error"] is None,
            "values_equal": equal(got["value"]),
            "retries": got["faults_met"] if got["error"] is None else None,
            "requests": got["requests"],
            "seconds": got["seconds"],
        } | ({"error": _error_text(got["error"], key)} if got["error"] else {})

    # A write of one block with 3 x 503 on its shard's PUT, then read back without faults.
    prefix = f"write-{backend}-{uuid.uuid4().hex[:6]}"
    store = make(server.endpoint, bucket, prefix, False)
    create_arrays(store, {n: np.zeros_like(v) for n, v in values.items()}, layout)
    server.faults.fail(3, 503, method="PUT", path=f"{prefix}/{key}")
    wrote = _attempt(
        server,
        lambda: [
            run(a.setitem(rows, values[name][rows]))
            for a, name in zip(open_writable(store), ARRAYS, strict=True)
        ],
    )
    back = run(read_blocks(open_arrays(make(server.endpoint, bucket, prefix, True)), [b], block, 1))
    out["put_3x503"] = {
        "succeeded": wrote["error"] is None,
        "values_equal": equal(back[0]),
        "retries": wrote["faults_met"] if wrote["error"] is None else None,
        "seconds": wrote["seconds"],
    } | ({"error": _error_text(wrote["error"], key)} if wrote["error"] else {})

    # A persistent fault: what the caller is told, and after how long.
    if backend == "obstore":  # fastkd's number of retries, short backoff (the default waits ~1 min)
        arrays = open_arrays(obstore_store(server.endpoint, bucket, PREFIX, True, fast_retry=True))
    server.faults.fail(100, 503, method="GET", path=key)
    got = _attempt(server, read(arrays))
    out["get_persistent_503"] = {
        "succeeded": got["error"] is None,
        "values_equal": equal(got["value"]),
        "requests": got["requests"],
        "seconds": got["seconds"],
        "backoff": (
            "fastkd's max_retries, backoff 10-100 ms" if backend == "obstore" else "s3fs's defaults"
        ),
    } | ({"error": _error_text(got["error"], key)} if got["error"] else {})
    out["create_if_absent"] = create_if_absent(server, bucket, backend)
    return out


def open_writable(store: Any) -> list[Any]:
    import zarr

    group = zarr.open_group(store, mode="r+", zarr_format=3)
    return [group[name]._async_array for name in ARRAYS]


def create_if_absent(server: Any, bucket: str, backend: str) -> dict:
    """Whether the backend's create-if-absent is one conditional PUT that the server refuses when
    the object exists: the client's own call, and zarr's ``Store.set_if_not_exists``."""
    from zarr.core.buffer import default_buffer_prototype

    key = f"claims/{backend}-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {}
    try:
        if backend == "obstore":
            import obstore
            import obstore.exceptions as oe

            client = obstore_store(server.endpoint, bucket, "", False).store

            def create(data: bytes) -> bool:
                try:
                    obstore.put(client, key, data, mode="create")
                except oe.AlreadyExistsError:
                    return False
                return True

            out["client_call"] = "obstore.put(mode='create')"
        else:
            fs = fsspec_store(server.endpoint, bucket, "", False).fs

            def create(data: bytes) -> bool:
                try:
                    run(fs._pipe_file(f"{bucket}/{key}", data, mode="create"))
                except FileExistsError:
                    return False
                return True

            out["client_call"] = "s3fs pipe_file(mode='create')"
        with proxy_hook(server, key) as methods:
            first, second = create(b"first"), create(b"second")
        out["first_created"], out["second_refused"] = first, not second
        out["requests"] = methods
        store = (obstore_store if backend == "obstore" else fsspec_store)(
            server.endpoint, bucket, "", False
        )
        zarr_key = key + "-zarr"
        buffer = default_buffer_prototype().buffer
        with proxy_hook(server, zarr_key) as methods:
            run(store.set_if_not_exists(zarr_key, buffer.from_bytes(b"first")))
            run(store.set_if_not_exists(zarr_key, buffer.from_bytes(b"second")))
        got = run(store.get(zarr_key, default_buffer_prototype()))
        out["zarr_set_if_not_exists"] = {
            "kept_first": got is not None and got.to_bytes() == b"first",
            "requests": methods,
            "atomic": "HEAD" not in methods,  # else: a check, then a plain PUT
        }
    except Exception as error:
        out["error"] = _error_text(error, key)
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=65536)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="blocks in flight"
    )
    parser.add_argument("--reads", type=int, default=64, help="random blocks per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latency-ms", type=float, default=20.0,
        help="added to each request for the reads through the proxy (0: none)",
    )  # fmt: skip
    parser.add_argument("--no-faults", action="store_true", help="throughput only")
    parser.add_argument(
        "--quick", action="store_true",
        help="a check that it runs: 2,048 samples, 1 and 8 in flight, 8 reads, 1 repeat, no faults",
    )  # fmt: skip
    parser.add_argument("--dir", type=Path, default=None, help="where the local copy goes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.concurrency, args.reads, args.repeats = 2048, [1, 8], 8, 1
        args.no_faults, args.latency_ms = True, 0.0

    from fastkd.runtime import machine_name
    from fastkd.store.manifest import StoreLayout

    layout = StoreLayout.for_store(args.samples, args.views, None)
    block = layout.samples_per_shard
    values = make_values(args.samples, args.views, args.topk, args.classes, args.seed)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = start_server()
    workdir = Path(tempfile.mkdtemp(prefix="fastkd-bench-objstore-", dir=args.dir))
    try:
        bucket = server.new_bucket()
        local_root = workdir / "store" / "models" / "m"
        create_arrays(local_store(local_root, False), values, layout)
        stored = np.zeros(layout.num_blocks)
        for name in ARRAYS:
            for b in range(layout.num_blocks):
                stored[b] += (local_root / shard_key(name, b)).stat().st_size
        # Write times; then the array the reads read, written by obstore.
        write_s: dict[str, float] = {}  # the whole array through each backend (not --quick)
        writers = [("obstore", obstore_store), ("fsspec", fsspec_store)] if not args.quick else []
        for backend, make in writers:
            start = time.perf_counter()
            create_arrays(make(server.moto_endpoint, bucket, f"w-{backend}", False), values, layout)
            write_s[backend] = round(time.perf_counter() - start, 3)
        if writers:
            start = time.perf_counter()
            create_arrays(local_store(workdir / "w-local", False), values, layout)
            write_s["local"] = round(time.perf_counter() - start, 3)
        create_arrays(obstore_store(server.moto_endpoint, bucket, PREFIX, False), values, layout)

        backends = {
            "obstore": lambda: obstore_store(server.moto_endpoint, bucket, PREFIX, True),
            "fsspec": lambda: fsspec_store(server.moto_endpoint, bucket, PREFIX, True),
            "fsspec_one_request": lambda: fsspec_store(
                server.moto_endpoint, bucket, PREFIX, True, one_request=True
            ),
            "local": lambda: local_store(local_root, True),
        }
        reads: dict[str, dict] = {}

        def measure(arrays: list[Any], concurrency: list[int]) -> dict:
            return {
                str(c): throughput(
                    arrays,
                    layout.num_blocks,
                    block,
                    args.views,
                    stored,
                    c,
                    args.reads,
                    args.repeats,
                    args.seed,
                )
                for c in concurrency
            }

        check_rows = slice(0, block)
        for backend, make in backends.items():
            arrays = open_arrays(make())
            got = run(read_blocks(arrays, [0], block, 1))[0]
            assert all(
                np.array_equal(g, values[n][check_rows]) for g, n in zip(got, ARRAYS, strict=True)
            ), backend
            reads[backend] = measure(arrays, args.concurrency)
            print(backend, {c: r["views_per_s"] for c, r in reads[backend].items()}, flush=True)

        # The same through the proxy with a network's latency added to every request.
        latency: dict[str, Any] = {}
        if args.latency_ms and server.faults is not None:
            for backend in ("obstore", "fsspec", "fsspec_one_request"):
                make = {"obstore": obstore_store, "fsspec": fsspec_store}.get(
                    backend, functools.partial(fsspec_store, one_request=True)
                )
                arrays = open_arrays(make(server.endpoint, bucket, PREFIX, True))
                with proxy_hook(server, delay_s=args.latency_ms / 1000):
                    latency[backend] = measure(arrays, args.concurrency)
                print(
                    backend,
                    args.latency_ms,
                    "ms:",
                    {c: r["views_per_s"] for c, r in latency[backend].items()},
                    flush=True,
                )

        faults: dict[str, Any] = {}
        if args.no_faults:
            faults = {"skipped": "--no-faults"}
        elif server.faults is None:
            faults = {"skipped": "no fault proxy (the repository's tests/s3_server.py is not here)"}
        else:
            for backend in ("obstore", "fsspec"):
                faults[backend] = robustness(server, bucket, backend, values, layout)
                print(backend, json.dumps(faults[backend]), flush=True)
    finally:
        close_file_systems()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    import obstore
    import s3fs
    import zarr

    result = {
        "machine": machine_name("cpu"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "zarr": zarr.__version__,
            "obstore": obstore.__version__,
            "s3fs": s3fs.__version__,
            "moto": _version("moto"),
            "botocore": _version("botocore"),
        },
        "server": (
            "moto's ThreadedMotoServer on 127.0.0.1, same machine (throughput: direct; faults: "
            "through the tests' fault proxy)"
        ),
        "data": (
            f"{args.samples} samples x {args.views} views x top-{args.topk}: fp16 log-probabilities "
            f"and int16 ids, fastkd's layout (shards of {block} samples, inner chunks of "
            f"{layout.chunk_samples}, blosc-zstd, views innermost); synthetic values"
        ),
        "read_unit": (
            f"one block: the whole shard of each of the 2 arrays ({block} samples, "
            f"{block * args.views} views), decoded, as the reader's block cache reads it"
        ),
        "stored_bytes_per_block": round(float(stored.mean())),
        "num_blocks": layout.num_blocks,
        "reads_per_repeat": args.reads,
        "repeats": args.repeats,
        "statistic": "median of the repeats",
        "fsspec_settings": (
            "s3fs asynchronous=True, max_pool_connections=64, default retries; "
            "fsspec_one_request: the same with max_concurrency=1 (no HEAD before each GET)"
        ),
        "obstore_settings": "fastkd.storage's client: max_retries 10, backoff 0.1-15 s",
        "write_seconds_whole_array": write_s,
        "reads_note": (
            "reads: straight to moto; reads_with_latency: through the proxy, "
            f"{args.latency_ms:g} ms added before each request is answered (about an object "
            "store's time to first byte)"
        ),
        "reads": reads,
        "reads_with_latency": latency,
        "faults": faults,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
