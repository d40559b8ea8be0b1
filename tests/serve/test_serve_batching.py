"""The batcher: merging concurrent requests, splitting large ones, mixed kinds, admission, cancellation, drain."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from virchow.models import pool_tokens
from virchow.serve.batching import Batcher, NonFiniteOutputError, embed_direct, forward_segments
from virchow.serve.errors import ServiceUnavailableError
from virchow.serve.metrics import ServeMetrics

from .serve_harness import slow_embedder


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, 224, 224, generator=generator)


def reference(embedder, images: torch.Tensor, kind: str) -> np.ndarray:
    with torch.inference_mode():
        tokens = embedder.model(images).float()
    return pool_tokens(tokens, kind, embedder.spec.num_prefix_tokens).numpy()


class CountingBatcher(Batcher):
    """Record the image count of every forward pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forward_sizes: list[int] = []

    def _forward(self, pieces):
        self.forward_sizes.append(sum(stop - start for _job, start, stop in pieces))
        return super()._forward(pieces)


def run_with_batcher(embedder, scenario, **options):
    """Run ``scenario(batcher)`` on a fresh event loop with a started batcher, then close it."""

    async def main():
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = CountingBatcher(embedder, executor, **options)
        batcher.start()
        try:
            return await scenario(batcher), batcher
        finally:
            await batcher.close(5.0)
            executor.shutdown()

    return asyncio.run(main())


def test_embed_matches_direct_model(embedder, images):
    expected = embedder.embed_normalised(images[:3]).numpy()
    (result, _batcher) = run_with_batcher(embedder, lambda batcher: batcher.embed(images[:3], "cls+mean"))
    assert result.dtype == np.float32
    assert np.abs(result - expected).max() <= 1e-6


def test_concurrent_requests_share_a_forward_pass(embedder, images):
    async def scenario(batcher):
        return await asyncio.gather(*(batcher.embed(images[2 * i : 2 * i + 2], "cls+mean") for i in range(4)))

    results, batcher = run_with_batcher(embedder, scenario, max_batch_size=8, max_wait_s=0.5)
    assert batcher.forward_sizes == [8]
    expected = reference(embedder, images[:8], "cls+mean")
    assert np.abs(np.concatenate(results) - expected).max() <= 1e-5


def test_large_request_is_split(embedder, images):
    result, batcher = run_with_batcher(embedder, lambda batcher: batcher.embed(images[:10], "cls"), max_batch_size=4)
    assert batcher.forward_sizes == [4, 4, 2]
    assert result.shape == (10, 160)
    assert np.abs(result - reference(embedder, images[:10], "cls")).max() <= 1e-5


def test_mixed_kinds_in_one_batch(embedder, images):
    async def scenario(batcher):
        return await asyncio.gather(
            batcher.embed(images[:2], "cls"), batcher.embed(images[2:5], "mean"), batcher.embed(images[5:6], "cls+mean")
        )

    (cls, mean, both), batcher = run_with_batcher(embedder, scenario, max_batch_size=8, max_wait_s=0.5)
    assert batcher.forward_sizes == [6]
    assert np.abs(cls - reference(embedder, images[:2], "cls")).max() <= 1e-5
    assert np.abs(mean - reference(embedder, images[2:5], "mean")).max() <= 1e-5
    assert np.abs(both - reference(embedder, images[5:6], "cls+mean")).max() <= 1e-5


def test_batch_waits_at_most_max_wait(embedder, images):
    async def scenario(batcher):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.embed(images[:1], "cls")
        return loop.time() - started

    elapsed, batcher = run_with_batcher(embedder, scenario, max_batch_size=32, max_wait_s=0.05)
    assert batcher.forward_sizes == [1]
    assert elapsed >= 0.05


def test_admission_limit(embedder):
    metrics = ServeMetrics()

    async def scenario(batcher):
        with batcher.admit(6):
            assert batcher.pending_images == 6
            with pytest.raises(ServiceUnavailableError) as error, batcher.admit(3):
                pass
            with batcher.admit(2):
                assert batcher.pending_images == 8
        return error.value

    error, batcher = run_with_batcher(embedder, scenario, max_pending_images=8, retry_after_s=3, metrics=metrics)
    assert error.status == 503
    assert error.code == "overloaded"
    assert error.headers["Retry-After"] == "3"
    assert batcher.pending_images == 0
    assert metrics.rejected_overload._value.get() == 1


def test_cancelled_request_leaves_queue(embedder, images):
    slow = slow_embedder(embedder, 0.3)

    async def scenario(batcher):
        first = asyncio.ensure_future(batcher.embed(images[:2], "cls"))
        await asyncio.sleep(0.05)  # the first batch is now in the model
        second = asyncio.ensure_future(batcher.embed(images[2:4], "cls"))
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 2
        second.cancel()
        await asyncio.sleep(0)
        assert batcher.queued_images == 0
        third = await batcher.embed(images[4:5], "cls")
        return await first, third

    (first, third), batcher = run_with_batcher(slow, scenario, max_batch_size=2, max_wait_s=0.0)
    assert batcher.forward_sizes == [2, 1]
    assert first.shape == (2, 160)
    assert third.shape == (1, 160)


def test_close_drains_admitted_requests(embedder, images):
    slow = slow_embedder(embedder, 0.2)

    async def main():
        executor = ThreadPoolExecutor(max_workers=1)
        batcher = Batcher(slow, executor, max_batch_size=2, max_wait_s=0.0)
        batcher.start()

        async def request(rows):
            with batcher.admit(rows.shape[0]):
                return await batcher.embed(rows, "cls")

        tasks = [asyncio.ensure_future(request(images[2 * i : 2 * i + 2])) for i in range(3)]
        await asyncio.sleep(0.05)
        await batcher.close(10.0)
        with pytest.raises(ServiceUnavailableError) as refused, batcher.admit(1):
            pass
        executor.shutdown()
        return [task.result() for task in tasks], refused.value

    results, refused = asyncio.run(main())
    assert [result.shape for result in results] == [(2, 160)] * 3
    assert refused.code == "shutting_down"


def test_forward_failure_fails_only_its_requests(embedder, images):
    class Broken(torch.nn.Module):
        def forward(self, batch):
            raise RuntimeError("CUDA out of memory (simulated)")

    broken = copy.copy(embedder)
    broken.model = Broken()

    async def scenario(batcher):
        with pytest.raises(RuntimeError, match="simulated"):
            await batcher.embed(images[:2], "cls")
        batcher.embedder = embedder
        return await batcher.embed(images[:1], "cls")

    result, _batcher = run_with_batcher(broken, scenario)
    assert result.shape == (1, 160)


def test_non_finite_rows_reported(embedder, images):
    class NanModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            tokens = self.inner(batch)
            tokens[batch[:, 0, 0, 0] > 100] = float("nan")  # rows carrying the marker pixel
            return tokens

    nan_embedder = copy.copy(embedder)
    nan_embedder.model = NanModel(embedder.model)

    marked = images[:3].clone()
    marked[1, 0, 0, 0] = 1000.0

    async def scenario(batcher):
        with pytest.raises(NonFiniteOutputError) as error:
            await batcher.embed(marked, "cls")
        return error.value

    error, _batcher = run_with_batcher(nan_embedder, scenario)
    assert error.status == 500
    assert error.code == "non_finite_output"
    assert "rows 1 " in error.message
    with pytest.raises(NonFiniteOutputError, match="rows 1 "):
        embed_direct(nan_embedder, marked, "cls", 1)


def test_forward_segments_match_embedder(embedder, images):
    (cls, both) = forward_segments(embedder, images[:4], [(0, 2, "cls"), (2, 4, "cls+mean")])
    assert np.abs(cls - embedder.embed_normalised(images[:2]).numpy()[:, :160]).max() <= 1e-6
    assert np.abs(both - embedder.embed_normalised(images[2:4]).numpy()).max() <= 1e-6
