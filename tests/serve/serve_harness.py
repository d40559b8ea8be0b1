"""Helpers of the serve tests: a real uvicorn server in a thread, a local image host, request builders.

Every socket here binds or connects to 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import copy
import http.server
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import torch
import uvicorn
from PIL import Image

from virchow.serve.app import create_app
from virchow.serve.errors import BadRequestError
from virchow.serve.fetch import direct_transport
from virchow.serve.settings import ServeSettings

LOOPBACK = "127.0.0.1"


class LoopbackGuard:
    """DNS and connection layer of test servers that can reach nothing but loopback addresses.

    The address policy under test should already stop every other destination. The guard makes sure a
    bug in it cannot send traffic off this machine: names other than ``localhost`` are not looked up
    (numeric forms such as ``2130706433`` are parsed locally), and connections to addresses outside
    127.0.0.0/8 and ::1 fail. Each attempt is recorded, and a fixture fails the test that made it.
    """

    def __init__(self) -> None:
        self.violations: list[str] = []

    async def resolve(self, host: str, port: int) -> list:
        if host == "localhost":
            return [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            self.violations.append(f"DNS lookup of {host}")
            raise BadRequestError(f"the test resolver does not look up {host}", code="fetch_failed") from None
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))

    def transport(self) -> httpx.AsyncBaseTransport:
        return _GuardedTransport(self, direct_transport())


class _GuardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, guard: LoopbackGuard, inner: httpx.AsyncBaseTransport) -> None:
        self.guard = guard
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            address = ipaddress.ip_address(request.url.host)
        except ValueError:
            address = None
        if address is None or not address.is_loopback:
            self.guard.violations.append(f"connection to {request.url.host}")
            raise httpx.ConnectError(f"the test guard blocks connections to {request.url.host}")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


GUARD = LoopbackGuard()


def score_body(images: list[str], *, nested: bool = True, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a ``/score`` body in the model card's shape."""
    data: list[Any] = [[image] for image in images] if nested else list(images)
    body: dict[str, Any] = {"input_data": {"columns": ["image"], "index": list(range(len(images))), "data": data}}
    if params is not None:
        body["params"] = params
    return body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reencode(path: Path, image_format: str, **options: Any) -> bytes:
    """Return the tile at ``path`` encoded as ``image_format`` in memory."""
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """Return a tiny PNG whose header declares ``width`` x ``height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


class _SlowModel(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, delay_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return self.inner(batch)


def slow_embedder(embedder: Any, delay_s: float) -> Any:
    """Return a shallow copy of ``embedder`` whose forward pass sleeps ``delay_s`` first."""
    slow = copy.copy(embedder)
    slow.model = _SlowModel(embedder.model, delay_s)
    return slow


class ServerHandle:
    """A real uvicorn server on 127.0.0.1 and an ephemeral port, running in a thread."""

    def __init__(self, settings: ServeSettings, **app_options: Any) -> None:
        self.settings = settings
        self.load_failures: list[BaseException] = []
        self.app = create_app(settings, on_load_failure=self.load_failures.append, **app_options)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((LOOPBACK, 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = uvicorn.Config(
            self.app, log_config=None, timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=30.0)
        self._wait_started()

    def _wait_started(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server.started:
                return
            time.sleep(0.02)
        raise TimeoutError(f"uvicorn did not start within {timeout_s} s")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.client.get("/ready").status_code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"/ready did not return 200 within {timeout_s} s")

    def score(self, body: Any, **kwargs: Any) -> httpx.Response:
        return self.client.post("/score", json=body, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.client.close()


def start_server(embedder: Any, **settings: Any) -> ServerHandle:
    """Start a server for the tiny test model with ``settings`` overriding the test defaults.

    URL rows go through :data:`GUARD`, so they can reach loopback addresses only.
    """
    defaults: dict[str, Any] = {
        "model": "virchow-test",
        "weights": "random:0",
        "device": "cpu",
        "precision": "fp32",
        "max_batch_size": 8,
        "max_wait_ms": 2.0,
        "decode_threads": 2,
        "shutdown_timeout_s": 10.0,
    }
    defaults.update(settings)
    app_options = {"fetch_resolver": GUARD.resolve, "fetch_transport": GUARD.transport()}
    if "embedder_factory" in defaults:
        app_options["embedder_factory"] = defaults.pop("embedder_factory")
    handle = ServerHandle(ServeSettings(**defaults), embedder=embedder, **app_options)
    if "embedder_factory" not in app_options:
        handle.wait_ready()
    return handle


@dataclass
class ImageHost:
    """A local HTTP server on 127.0.0.1 serving test images, redirects, stalls and oversized bodies.

    Routes: ``/tiles/NAME``, ``/redirect?to=URL``, ``/stall``, ``/big?bytes=N`` (with Content-Length),
    ``/drip?bytes=N`` (chunked, no Content-Length), ``/gzip``, ``/status?code=N``.
    """

    files: dict[str, bytes]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ImageHost:
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                query = parse_qs(parsed.query)
                host.requests.append((self.path, self.headers.get("Host")))
                if parsed.path.startswith("/tiles/") and parsed.path[7:] in host.files:
                    self._send(200, host.files[parsed.path[7:]])
                elif parsed.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", query["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif parsed.path == "/stall":
                    host.release.wait(30)
                    self._send(200, b"")
                elif parsed.path == "/big":
                    size = int(query["bytes"][0])
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    self._write_quietly(b"\0" * size)
                elif parsed.path == "/drip":
                    self._send_chunked(int(query["bytes"][0]))
                elif parsed.path == "/gzip":
                    self.send_response(200)
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", "3")
                    self.end_headers()
                    self._write_quietly(b"abc")
                elif parsed.path == "/status":
                    self._send(int(query["code"][0]), b"")
                else:
                    self._send(404, b"")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self._write_quietly(body)

            def _send_chunked(self, size: int) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"\0" * 65536
                sent = 0
                while sent < size:
                    piece = block[: min(len(block), size - sent)]
                    if not self._write_quietly(f"{len(piece):x}\r\n".encode() + piece + b"\r\n"):
                        return
                    sent += len(piece)
                self._write_quietly(b"0\r\n\r\n")

            def _write_quietly(self, data: bytes) -> bool:
                try:
                    self.wfile.write(data)
                    return True
                except (BrokenPipeError, ConnectionResetError):
                    return False

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)
