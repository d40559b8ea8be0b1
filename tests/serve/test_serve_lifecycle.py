"""Readiness, overload (503), timeouts (504) and graceful shutdown of a real server."""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from virchow.errors import WeightsAccessError

from .serve_harness import b64, score_body, slow_embedder, start_server, wait_until


def test_ready_only_after_model_loaded(embedder, tiles):
    release = threading.Event()

    def slow_factory(settings):
        release.wait(20)
        return embedder

    handle = start_server(None, embedder_factory=slow_factory)
    try:
        assert handle.client.get("/health").status_code == 200
        not_ready = handle.client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["code"] == "not_ready"
        assert not_ready.headers["retry-after"] == "1"
        early = handle.score(score_body([b64(tiles["tile0.png"])]))
        assert early.status_code == 503
        assert "retry-after" in early.headers
        assert handle.client.get("/").json()["ready"] is False
        assert "virchow_serve_ready 0.0" in handle.client.get("/metrics").text

        release.set()
        handle.wait_ready()
        assert handle.score(score_body([b64(tiles["tile0.png"])])).status_code == 200
    finally:
        release.set()
        handle.stop()


def test_load_failure_reported(tiles):
    def failing_factory(settings):
        raise WeightsAccessError("weights /models/absent not found (simulated)")

    handle = start_server(None, embedder_factory=failing_factory)
    try:
        wait_until(lambda: handle.load_failures)
        assert isinstance(handle.load_failures[0], WeightsAccessError)
        response = handle.client.get("/ready")
        assert response.status_code == 503
        assert response.json()["code"] == "load_failed"
        assert "absent" not in response.text  # details stay in the log
        assert handle.score(score_body([b64(tiles["tile0.png"])])).status_code == 503
        assert handle.client.get("/health").status_code == 200
    finally:
        handle.stop()


def test_full_queue_returns_503(server_factory, embedder, tiles):
    handle = server_factory(
        embedder=slow_embedder(embedder, 0.6), max_rows=2, max_pending_images=2, max_batch_size=2, retry_after_s=2
    )
    body = score_body([b64(tiles["tile0.png"]), b64(tiles["tile1.png"])])
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(handle.score, body)
        wait_until(lambda: "virchow_serve_pending_images 2.0" in handle.client.get("/metrics").text)
        refused = handle.score(score_body([b64(tiles["tile2.png"])]))
        assert first.result().status_code == 200
    assert refused.status_code == 503
    assert refused.json()["code"] == "overloaded"
    assert refused.headers["retry-after"] == "2"
    assert "virchow_serve_overload_rejections_total 1.0" in handle.client.get("/metrics").text
    assert handle.score(score_body([b64(tiles["tile2.png"])])).status_code == 200


def test_slow_request_returns_504(server_factory, embedder, tiles):
    handle = server_factory(embedder=slow_embedder(embedder, 1.5), request_timeout_s=0.5, max_batch_size=1)
    started = time.monotonic()
    response = handle.score(score_body([b64(tiles["tile0.png"]), b64(tiles["tile1.png"])]))
    assert response.status_code == 504
    assert response.json()["code"] == "request_timeout"
    assert time.monotonic() - started < 1.4
    wait_until(lambda: "virchow_serve_pending_images 0.0" in handle.client.get("/metrics").text, timeout_s=10)
    assert handle.client.get("/health").status_code == 200


def test_shutdown_drains_in_flight_requests(embedder, tiles):
    handle = start_server(slow_embedder(embedder, 0.4), max_batch_size=1, shutdown_timeout_s=20)
    bodies = [score_body([b64(tiles[f"tile{i}.png"])]) for i in range(3)]
    clients = [httpx.Client(base_url=handle.url, trust_env=False, timeout=30) for _ in bodies]
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(client.post, "/score", json=body) for client, body in zip(clients, bodies, strict=True)]
            wait_until(lambda: handle.app.state.serve.batcher.pending_images == 3)
            handle.server.should_exit = True
            responses = [future.result() for future in futures]
        handle.thread.join(timeout=30)
        assert not handle.thread.is_alive()
        assert [response.status_code for response in responses] == [200, 200, 200]
        assert all(len(response.json()) == 1 for response in responses)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{handle.url}/health", trust_env=False, timeout=2)
    finally:
        for client in clients:
            client.close()
        handle.stop()


class _FailOnPairs(torch.nn.Module):
    """Run the model, except on batches of two images, where it raises (warm-up uses one image)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] == 2:
            raise RuntimeError("simulated driver failure 0xDEAD")
        return self.inner(batch)


def test_internal_error_is_generic_and_logged(server_factory, embedder, tiles, caplog):
    caplog.set_level(logging.ERROR, logger="virchow.serve")
    failing = copy.copy(embedder)
    failing.model = _FailOnPairs(embedder.model)
    handle = server_factory(embedder=failing, max_wait_ms=200.0)

    response = handle.score(score_body([b64(tiles["tile0.png"]), b64(tiles["tile1.png"])]))
    assert response.status_code == 500
    payload = response.json()
    request_id = response.headers["x-request-id"]
    assert payload["code"] == "internal_error"
    assert payload["request_id"] == request_id
    assert request_id in payload["message"]
    assert "0xDEAD" not in response.text
    logged = caplog.text
    assert request_id in logged
    assert "0xDEAD" in logged
    assert handle.score(score_body([b64(tiles["tile0.png"])])).status_code == 200
