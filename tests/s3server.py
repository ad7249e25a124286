"""A real S3-protocol server on loopback for the object-store tests: moto's server
(``python -m moto.server``) in its own process, one bucket per test."""

from __future__ import annotations

import dataclasses
import http.client
import os
import secrets
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``with S3Server() as srv:`` starts moto_server; ``srv.env`` is the environment a
    client needs (``AWS_ENDPOINT_URL`` and test credentials)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    def client(self):
        import boto3  # moto's own dependency: only the tests create buckets

        return boto3.client("s3", endpoint_url=self.endpoint, **_boto_kwargs())

    def new_bucket(self) -> str:
        name = f"cfs-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


def _boto_kwargs() -> dict:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_REGION"],
    }


def environ_with(server: S3Server) -> dict:
    return {**os.environ, **server.env}


INJECTED: Counter = Counter()
"""Faults injected by every proxy of this process, by kind (the README's figures)."""

S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclasses.dataclass
class Fault:
    """One kind of failure for the requests ``match(method, path)`` selects: the matching
    requests numbered ``skip`` and up (from 0) are faulted, every ``every``-th of them (1: each
    one), ``times`` in all (None: no end, a persistent fault) and ``each`` times at most for any
    one method and path (a transient fault: a request's own retries get through).  Kinds:

    - ``500``, ``503``: answered by the proxy with an S3 XML error (503 is ``SlowDown``),
      never forwarded;
    - ``"reset-upload"``: half of the request body relayed to the server, then the
      connection reset (RST) both ways: an upload cut off mid-body;
    - ``"reset-download"``: forwarded, then the response's headers and half its body sent
      and the connection reset;
    - ``"truncate"``: forwarded, then the response sent with its full ``Content-Length``
      but only half its body, and the connection closed cleanly (FIN);
    - ``"short"``: forwarded, then half the response body sent with a ``Content-Length``
      that matches it (a body cut short where HTTP cannot tell: only checksums can);
    - ``"drop"``: forwarded (the request lands), the response never relayed;
    - ``"delay"``: forwarded after ``delay`` seconds more (added latency).
    """

    match: Callable[[str, str], bool]
    kind: int | str
    times: int | None = 1
    skip: int = 0
    every: int = 1
    each: int | None = None
    delay: float = 0.0
    seen: int = 0
    hits: int = 0
    per_request: dict = dataclasses.field(default_factory=dict)

    def take(self, method: str, path: str) -> bool:
        if not self.match(method, path):
            return False
        n, self.seen = self.seen, self.seen + 1
        if n < self.skip or (n - self.skip) % self.every:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        if self.each is not None:
            if self.per_request.get((method, path), 0) >= self.each:
                return False
            self.per_request[method, path] = self.per_request.get((method, path), 0) + 1
        self.hits += 1
        INJECTED[self.kind] += 1
        return True


def requests_to(method: str | None = None, part: str = "") -> Callable[[str, str], bool]:
    """A predicate: requests with this method (any when None) whose path contains ``part``."""
    return lambda m, p: (method is None or m == method) and part in urllib.parse.unquote(p)


class FaultProxy:
    """A real TCP proxy on 127.0.0.1 in front of the S3 server that injects ``faults``
    (the first one matching a request decides; see :class:`Fault`) and forwards the rest
    after ``delay`` seconds (a network round trip).  It is bounded (at most ``max_conns``
    connections at once, each socket with a timeout) and stops by itself ``lifetime``
    seconds after it started, whatever the test does."""

    def __init__(
        self,
        port: int,
        faults: list[Fault] | None = None,
        delay: float = 0.0,
        lifetime: float = 300.0,
        max_conns: int = 64,
    ) -> None:
        self.backend_port, self.faults, self.delay, self.lifetime = port, list(faults or []), delay, lifetime
        self.requests: list[tuple[str, str, int | str]] = []  # (method, path, server status or unforwarded fault)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._slots = threading.BoundedSemaphore(max_conns)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        """The most requests the proxy held at once (received, not yet answered)."""

    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 60

            def handle(self) -> None:
                if not proxy._slots.acquire(timeout=30):
                    return
                try:
                    while proxy._relay(self.rfile, self.connection):
                        pass
                except OSError:
                    pass  # the client went away
                finally:
                    proxy._slots.release()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def hits(self, kind: int | str | None = None) -> int:
        return sum(f.hits for f in self.faults if kind is None or f.kind == kind)

    def _fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            return next((f for f in self.faults if f.take(method, path)), None)

    def _log(self, method: str, path: str, what: int | str) -> None:
        with self._lock:
            self.requests.append((method, path, what))

    def _relay(self, rfile, conn) -> bool:
        line = rfile.readline()
        if not line:
            return False
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._relay_request(line, rfile, conn)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _relay_request(self, line: bytes, rfile, conn) -> bool:
        if self.delay:
            time.sleep(self.delay)  # a network round trip
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers = []
        while (h := rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, value = h.decode("latin-1").split(":", 1)
            headers.append((name.strip(), value.strip()))
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        fault = self._fault(method, path)
        kind = None if fault is None else fault.kind
        if fault is not None and kind == "delay":
            time.sleep(fault.delay)
        if kind == "reset-upload":
            if length:  # (a request without a body is reset before it is forwarded)
                self._forward(method, path, headers, rfile.read(length // 2), declared=length)
            self._log(method, path, kind)
            _reset(conn)
            return False
        body = rfile.read(length) if length else None
        if kind in S3_ERRORS:
            code, message = S3_ERRORS[kind]  # type: ignore[index]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>cfs-proxy</RequestId></Error>"
            ).encode()
            reason = http.client.responses[kind]  # type: ignore[index]
            conn.sendall(
                f"HTTP/1.1 {kind} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\n\r\n".encode("latin-1")
                + xml
            )
            self._log(method, path, kind)
            return True
        status, reason, resp_headers, data = self._forward(method, path, headers, body)
        self._log(method, path, status)
        if kind == "drop":
            return False  # the request landed; the client never hears back
        out = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
        for k, v in resp_headers:
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                out.append(f"{k}: {v}\r\n".encode("latin-1"))
        if kind == "short" and len(data) > 1:
            data = data[: len(data) // 2]
        out.append(f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1"))
        head = b"".join(out)
        if kind in ("reset-download", "truncate") and method != "HEAD" and len(data) > 1:
            conn.sendall(head + data[: len(data) // 2])
            if kind == "reset-download":
                _reset(conn)
            else:
                conn.shutdown(socket.SHUT_WR)
            return False
        conn.sendall(head + data)
        return True

    def _forward(self, method, path, headers, body, declared: int | None = None):
        """Send the request to the server; with ``declared`` (a cut-off upload), send only
        ``body`` of the declared length and close: the server sees the body end early."""
        if declared is not None:
            with socket.create_connection(("127.0.0.1", self.backend_port), 10) as s:
                lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
                s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                _reset(s)
            return None
        backend = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=60)
        try:
            backend.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                backend.putheader(k, v)
            backend.endheaders(body)
            resp = backend.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            backend.close()


def _reset(conn: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: a connection reset by peer."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class DroppingProxy(FaultProxy):
    """A :class:`FaultProxy` that forwards every request (after ``delay`` seconds: a network
    round trip) and, for those ``drop(method, path)`` selects, lets the request land on the
    server but closes the client's connection instead of relaying the response: the failure
    of a PUT whose outcome the client cannot know."""

    def __init__(self, port: int, drop=lambda method, path: False, delay: float = 0.0, **kw: Any) -> None:
        super().__init__(port, [Fault(drop, "drop", times=None)], delay=delay, **kw)

    @property
    def dropped(self) -> int:
        return self.hits("drop")


def assert_trees_equal(a: dict, b: dict) -> None:
    """Two state dicts (nested) with the same keys and bit-equal arrays (dtype included)."""
    import numpy as np

    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_trees_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), strict=True)
