"""A real S3-protocol server on loopback for the object-store tests: moto's server
(``python -m moto.server``) in its own process, one bucket per test."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

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


class DroppingProxy:
    """A TCP proxy in front of the S3 server that forwards every request (after ``delay``
    seconds: a network round trip) and, for those ``drop(method, path)`` selects, lets the
    request land on the server but closes the client's connection instead of relaying the
    response: the failure of a PUT whose outcome the client cannot know."""

    def __init__(self, port: int, drop=lambda method, path: False, delay: float = 0.0) -> None:
        self.backend_port, self.drop, self.dropped, self.delay = port, drop, 0, delay
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status the server answered)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DroppingProxy:
        import socketserver
        import threading

        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while proxy._relay(self.rfile, self.connection):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _relay(self, rfile, conn) -> bool:
        import http.client

        line = rfile.readline()
        if not line:
            return False
        if self.delay:
            time.sleep(self.delay)  # a network round trip
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers = []
        while (h := rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, value = h.decode("latin-1").split(":", 1)
            headers.append((name.strip(), value.strip()))
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        body = rfile.read(length) if length else None
        backend = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=60)
        backend.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            backend.putheader(k, v)
        backend.endheaders(body)
        resp = backend.getresponse()
        data = resp.read()
        backend.close()
        self.requests.append((method, path, resp.status))
        if self.drop(method, path):
            self.dropped += 1
            return False  # the request landed; the client never hears back
        out = [f"HTTP/1.1 {resp.status} {resp.reason}\r\n".encode("latin-1")]
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                out.append(f"{k}: {v}\r\n".encode("latin-1"))
        out.append(f"Content-Length: {len(data)}\r\n\r\n".encode("latin-1"))
        conn.sendall(b"".join(out) + data)
        return True
