"""Fixtures of the serve tests: the tiny test model, real tiles, a local image host and a shared server.

The shared server allow-lists only the image host's port on 127.0.0.1, so other loopback ports stay
rejected. Tests that need other settings start their own server with ``start_server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virchow.embed import Embedder, create_embedder

from .serve_harness import GUARD, ImageHost, ServerHandle, reencode, start_server

# The shared server's limits, small enough that hostile-input tests stay fast.
MAX_ROWS = 8
MAX_BODY_BYTES = 2 * 1024 * 1024
FETCH_MAX_BYTES = 1024 * 1024
FETCH_TIMEOUT_S = 1.5


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fail any test whose server tried to look up a name or connect beyond loopback."""
    GUARD.violations.clear()
    yield
    assert GUARD.violations == [], "a test server tried to leave loopback"


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return create_embedder("virchow-test", "random:0", device="cpu", precision="fp32", batch_size=8)


@pytest.fixture(scope="session")
def tiles(labeled_tiles: Path) -> dict[str, bytes]:
    """Real tiles as encoded files: PNG and TIFF as stored, JPEG re-encoded from a PNG tile."""
    pngs = sorted((labeled_tiles / "CRC-VAL-HE-7K").glob("*/*.png"))
    tiffs = sorted((labeled_tiles / "Kather2016-texture").glob("*/*.tif"))
    files = {f"tile{i}.png": path.read_bytes() for i, path in enumerate(pngs[::4][:6])}
    files["tile.tif"] = tiffs[0].read_bytes()
    files["tile.jpg"] = reencode(pngs[1], "JPEG", quality=90)
    files["tile.gif"] = reencode(pngs[2], "GIF")
    return files


@pytest.fixture(scope="session")
def image_host(tiles: dict[str, bytes]) -> Iterator[ImageHost]:
    host = ImageHost(files=tiles).start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def other_image_host(tiles: dict[str, bytes]) -> Iterator[ImageHost]:
    """A second loopback host whose port no allow-list covers; it must never be contacted."""
    host = ImageHost(files=tiles).start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def server(embedder: Embedder, image_host: ImageHost) -> Iterator[ServerHandle]:
    handle = start_server(
        embedder,
        max_rows=MAX_ROWS,
        max_pending_images=64,
        max_body_bytes=MAX_BODY_BYTES,
        fetch_allow=(f"127.0.0.1:{image_host.port}",),
        fetch_max_bytes=FETCH_MAX_BYTES,
        fetch_timeout_s=FETCH_TIMEOUT_S,
    )
    yield handle
    handle.stop()


@pytest.fixture
def server_factory(embedder: Embedder) -> Iterator:
    """Start servers with custom settings; all are stopped after the test."""
    started: list[ServerHandle] = []

    def factory(**settings) -> ServerHandle:
        handle = start_server(settings.pop("embedder", embedder), **settings)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        handle.stop()
