"""A real S3 server for the tests: moto's, on 127.0.0.1, behind a proxy that injects faults.

``S3Server`` starts moto's threaded server on a free loopback port and a small HTTP proxy in
front of it; clients talk to the proxy. ``faults`` tells the proxy to answer the next requests
(optionally only those whose method and path match) with a status (503, 500, ...) or to drop the
connection without an answer, as a flaky server or network does, then to forward again. Nothing
leaves the loopback address; both servers stop with ``stop()`` (the fixture's teardown).
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY = "fastkd-test-key"
SECRET_KEY = "fastkd-test-secret"
REGION = "us-east-1"


@dataclass
class Faults:
    """Faults to inject: the next ``count`` requests matching ``method``/``path`` fail as ``kind``
    (an HTTP status, or ``"drop"``: close without answering)."""

    _rules: list[list] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    injected: int = 0
    requests: int = 0
    access_keys: set[str] = field(default_factory=set)  # the key ids requests were signed with

    def fail(self, count: int, kind: int | str = 503, method: str = ".*", path: str = ".*") -> None:
        with self._lock:
            self._rules.append([count, kind, re.compile(method), re.compile(path)])

    def clear(self) -> None:
        """No faults, counters at zero."""
        with self._lock:
            self._rules.clear()
            self.injected = self.requests = 0
            self.access_keys.clear()

    def take(self, method: str, path: str) -> int | str | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                count, kind, m, p = rule
                if count > 0 and m.fullmatch(method) and p.search(path):
                    rule[0] -= 1
                    self.injected += 1
                    return kind
        return None


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()  # headers and body go out as separate writes: no Nagle delay between
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        signed = re.search(r"Credential=([^/]+)/", self.headers.get("Authorization") or "")
        if signed:
            self.server.faults.access_keys.add(signed[1])
        fault = self.server.faults.take(self.command, self.path)
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if isinstance(fault, int):
            payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(fault)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD's answer has no body: the client reads none
                self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
            self.send_response(reply.status, reply.reason)
            length = reply.getheader("Content-Length") if self.command == "HEAD" else None
            for key, value in reply.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], faults: Faults) -> None:
        super().__init__(("127.0.0.1", 0), _Proxy)
        self.upstream = upstream
        self.faults = faults


class S3Server:
    """moto's S3 server and the fault proxy, on loopback ports; ``endpoint`` is the proxy's."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.moto_endpoint = f"http://{host}:{port}"
        self.faults = Faults()
        self._proxy = _ProxyServer(self._moto.get_host_and_port(), self.faults)
        self._thread = threading.Thread(target=self._proxy.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._proxy.server_address[1]}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables a user would set for this server."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):  # boto3, straight to moto: the tests' own view of the bucket
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.moto_endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        name = f"fastkd-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._proxy.shutdown()
        self._proxy.server_close()
        self._moto.stop()
