"""Test-wide settings: the Triton kernels run for real under the interpreter on CPU.

The compile check (tests/test_compile.py) compiles every kernel configuration in a separate
process for minutes; it starts as soon as the tests are collected and its tests run last, so
the rest of the suite runs meanwhile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
# Shard scans are cached under the user's cache folder (fastkd.data.shard_cache): not by tests.
os.environ["FASTKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastkd-test-cache-")

COMPILE_TESTS = "test_compile.py"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: no compile for deselected tests
def pytest_collection_modifyitems(session: pytest.Session, config, items: list) -> None:
    """Run the compile check's tests last, and start its compile now."""
    compile_items = [item for item in items if item.path.name == COMPILE_TESTS]
    if not compile_items:
        return
    items[:] = [item for item in items if item.path.name != COMPILE_TESTS] + compile_items
    out = Path(tempfile.mkdtemp(prefix="fastkd-compile-"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = (out / "log.txt").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "fastkd.bench.compile", "--arch", "90,80", "--out", str(out)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its compiling workers in its process group
    )
    config.stash[COMPILE_RUN] = (process, out)
    # A session that ends first (-x, a -k of a few tests) stops the run and its workers.
    config.add_cleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGTERM))


COMPILE_RUN = pytest.StashKey[tuple]()


@pytest.fixture(scope="session")
def compile_run(request: pytest.FixtureRequest) -> tuple[int, Path]:
    """The compile check's exit code and output folder (compile-sm90.json, compile-sm80.json)."""
    process, out = request.config.stash[COMPILE_RUN]
    return process.wait(timeout=1800), out


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server behind a fault-injecting proxy, on 127.0.0.1 (tests/s3_server.py)."""
    pytest.importorskip("moto.server")
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the test S3 server, reached the usual way (AWS_* environment
    variables); faults cleared before and after. Yields ``(server, bucket)``."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3_server.faults.clear()
    yield s3_server, s3_server.new_bucket()
    s3_server.faults.clear()
