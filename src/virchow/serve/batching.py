"""Dynamic batching: images of concurrent requests share forward passes on one model thread.

Requests queue their decoded images. A collector task on the event loop takes images in arrival
order until a batch contains ``max_batch_size`` images or the oldest queued image has waited
``max_wait_s``. It runs the forward pass on a single worker thread, so the event loop keeps
accepting and decoding requests meanwhile. A request larger than the batch size is split over
several batches. Each request may ask for its own embedding kind: one forward pass computes the
tokens and every request's slice is pooled its own way.

Admission is bounded: :meth:`Batcher.admit` reserves room for a request's images while they are
decoded, queued and embedded, and raises a 503 error when ``max_pending_images`` would be exceeded. A
request cancelled while queued (a timeout) gives up its queued images.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from virchow.embed import Embedder, create_embedder
from virchow.embed.device import autocast
from virchow.models import pool_tokens
from virchow.serve.errors import ServeError, ServiceUnavailableError

if TYPE_CHECKING:
    from virchow.serve.metrics import ServeMetrics
    from virchow.serve.settings import ServeSettings

_logger = logging.getLogger(__name__)

# (start, stop, kind): rows [start, stop) of a batch pooled as ``kind``.
Segment = tuple[int, int, str]


class NonFiniteOutputError(ServeError):
    """The model produced NaN or Inf for some rows, for example through fp16 overflow."""

    status = 500
    code = "non_finite_output"


def embedder_from_settings(settings: ServeSettings) -> Embedder:
    """Load the model that the settings name; the batch size is ``max_batch_size``."""
    return create_embedder(
        settings.model,
        settings.weights,
        kind=settings.embedding,
        device=settings.device,
        precision=settings.precision,
        batch_size=settings.max_batch_size,
        compile="off",
    )


def warm_up(embedder: Embedder, batch_size: int) -> None:
    """Run the model once on a blank image (and a full blank batch on GPUs) so the first request is not slow."""
    size = embedder.spec.preprocess.input_size
    sizes = [1] if embedder.device.type == "cpu" else [1, batch_size]
    for count in sizes:
        forward_segments(embedder, torch.zeros(count, 3, size, size), [(0, count, "cls")])


@torch.inference_mode()
def forward_segments(embedder: Embedder, batch: torch.Tensor, segments: Sequence[Segment]) -> list[np.ndarray]:
    """Run the model once on a normalised (B, 3, H, W) batch and pool each segment as its kind.

    The steps match :meth:`virchow.embed.Embedder.embed_normalised` (autocast forward, pooling of the
    float32 tokens), so the outputs equal the offline embedder's for the same images.

    Returns:
        One float32 array per segment, (stop - start, *embedding_shape).
    """
    batch = batch.to(embedder.device, non_blocking=True)
    with autocast(embedder.device, embedder.precision):
        tokens = embedder.model(batch)
    tokens = tokens.float()
    prefix = embedder.spec.num_prefix_tokens
    return [pool_tokens(tokens[start:stop], kind, prefix).cpu().numpy() for start, stop, kind in segments]


def embed_direct(embedder: Embedder, batch: torch.Tensor, kind: str, max_batch_size: int) -> np.ndarray:
    """Embed a normalised batch in chunks of ``max_batch_size`` on the calling thread, without a queue.

    Raises:
        NonFiniteOutputError: some rows came out as NaN or Inf; the message lists them.
    """
    outputs = []
    for start in range(0, batch.shape[0], max_batch_size):
        chunk = batch[start : start + max_batch_size]
        outputs.extend(forward_segments(embedder, chunk, [(0, chunk.shape[0], kind)]))
    result = np.concatenate(outputs)
    bad = non_finite_rows(result)
    if bad:
        raise NonFiniteOutputError(
            f"the model produced NaN or Inf for rows {', '.join(map(str, bad))} in {embedder.precision}; fp16 can "
            "overflow on unusual images: the server operator can switch to bf16 or fp32"
        )
    return result


def non_finite_rows(output: np.ndarray) -> list[int]:
    """Return the rows of ``output`` that contain NaN or Inf."""
    finite = np.isfinite(output.reshape(output.shape[0], -1)).all(axis=1)
    return np.flatnonzero(~finite).tolist()


@dataclass(eq=False)
class _Job:
    """One request's images in the queue."""

    batch: torch.Tensor
    kind: str
    future: asyncio.Future
    queued_at: float
    dispatched: int = 0  # images handed to the model so far
    finished: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    cancelled: bool = False

    @property
    def size(self) -> int:
        return int(self.batch.shape[0])

    @property
    def remaining(self) -> int:
        return self.size - self.dispatched


class Batcher:
    """Batch images of concurrent requests into forward passes on one worker thread.

    Args:
        embedder: the loaded model.
        executor: the single-thread executor that owns the model; loading and warm-up run there too.
        max_batch_size: images per forward pass.
        max_wait_s: how long the oldest queued image waits for a fuller batch.
        max_pending_images: images admitted at once, from decoding to the response.
        retry_after_s: ``Retry-After`` of 503 responses.
        metrics: optional Prometheus metrics.
    """

    def __init__(
        self,
        embedder: Embedder,
        executor: ThreadPoolExecutor,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_pending_images: int = 256,
        retry_after_s: int = 1,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.embedder = embedder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_pending_images = max_pending_images
        self.retry_after_s = retry_after_s
        self._executor = executor
        self._metrics = metrics
        self._jobs: collections.deque[_Job] = collections.deque()
        self._queued_images = 0
        self._pending_images = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    @property
    def pending_images(self) -> int:
        """Images admitted and not yet returned."""
        return self._pending_images

    @property
    def queued_images(self) -> int:
        """Images waiting for the model."""
        return self._queued_images

    def start(self) -> None:
        """Start the collector task on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="virchow-batcher")
        self._task.add_done_callback(self._collector_stopped)

    def _collector_stopped(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the collector must not leave requests waiting for their timeout.
        _logger.error("the batch collector stopped: %r", task.exception(), exc_info=task.exception())
        self._closing = True
        for job in self._jobs:
            self._fail(job, ServiceUnavailableError("the batch collector stopped; see the server log", code="unavailable"))
        self._jobs.clear()

    @contextlib.contextmanager
    def admit(self, count: int) -> Iterator[None]:
        """Reserve room for ``count`` images for the duration of the block.

        Raises:
            ServiceUnavailableError: the server is shutting down or the pending images would exceed the limit.
        """
        if self._closing:
            raise ServiceUnavailableError(
                "the server is shutting down: retry on another instance", code="shutting_down", retry_after_s=self.retry_after_s
            )
        if self._pending_images + count > self.max_pending_images:
            if self._metrics is not None:
                self._metrics.rejected_overload.inc()
            raise ServiceUnavailableError(
                f"the server is busy ({self._pending_images} images in progress, limit {self.max_pending_images}): "
                f"retry after {self.retry_after_s} s",
                code="overloaded",
                retry_after_s=self.retry_after_s,
            )
        self._pending_images += count
        self._update_gauges()
        try:
            yield
        finally:
            self._pending_images -= count
            self._update_gauges()

    async def embed(self, batch: torch.Tensor, kind: str) -> np.ndarray:
        """Queue a normalised (N, 3, H, W) batch and return its float32 embeddings in row order.

        Raises:
            NonFiniteOutputError: some rows came out as NaN or Inf; the message lists them.
        """
        loop = asyncio.get_running_loop()
        job = _Job(batch=batch, kind=kind, future=loop.create_future(), queued_at=loop.time())
        self._jobs.append(job)
        self._queued_images += job.size
        self._update_gauges()
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._cancel(job)
            raise

    def _cancel(self, job: _Job) -> None:
        if not job.cancelled:
            job.cancelled = True
            self._queued_images -= job.remaining
            self._update_gauges()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(loop)
            pieces = self._take()
            if not pieces:
                continue
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._forward, pieces)
            except Exception as exc:  # a failed forward (out of memory, a driver error) fails only its requests
                _logger.exception("forward pass over %d images failed", sum(stop - start for _, start, stop in pieces))
                for job, _start, _stop in pieces:
                    self._fail(job, exc)
                continue
            if self._metrics is not None:
                self._metrics.batch_size.observe(sum(stop - start for _, start, stop in pieces))
                self._metrics.inference_seconds.observe(time.perf_counter() - started)
            for (job, start, _stop), output in zip(pieces, outputs, strict=True):
                self._deliver(job, start, output)

    async def _wait_for_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._has_live_job():
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._jobs[0].queued_at + self.max_wait_s
        while self._queued_images < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _has_live_job(self) -> bool:
        while self._jobs and self._jobs[0].cancelled:
            self._jobs.popleft()
        return bool(self._jobs)

    def _take(self) -> list[tuple[_Job, int, int]]:
        pieces = []
        room = self.max_batch_size
        while room and self._jobs:
            job = self._jobs[0]
            if job.cancelled:
                self._jobs.popleft()
                continue
            count = min(room, job.remaining)
            pieces.append((job, job.dispatched, job.dispatched + count))
            job.dispatched += count
            room -= count
            self._queued_images -= count
            if job.remaining == 0:
                self._jobs.popleft()
        self._update_gauges()
        return pieces

    def _forward(self, pieces: Sequence[tuple[_Job, int, int]]) -> list[np.ndarray]:
        batch = torch.cat([job.batch[start:stop] for job, start, stop in pieces])
        segments = []
        offset = 0
        for job, start, stop in pieces:
            segments.append((offset, offset + stop - start, job.kind))
            offset += stop - start
        return forward_segments(self.embedder, batch, segments)

    def _deliver(self, job: _Job, start: int, output: np.ndarray) -> None:
        if job.cancelled or job.future.done():
            return
        bad = non_finite_rows(output)
        if bad:
            rows = ", ".join(str(start + row) for row in bad)
            self._fail(
                job,
                NonFiniteOutputError(
                    f"the model produced NaN or Inf for rows {rows} in {self.embedder.precision}; fp16 can overflow "
                    "on unusual images: the server operator can switch to bf16 or fp32"
                ),
            )
            return
        job.parts.append(output)
        job.finished += output.shape[0]
        if job.finished == job.size:
            job.future.set_result(np.concatenate(job.parts) if len(job.parts) > 1 else job.parts[0])

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._cancel(job)
        if not job.future.done():
            job.future.set_exception(exc)

    def _update_gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queued_images)
            self._metrics.pending_images.set(self._pending_images)

    async def close(self, timeout_s: float) -> None:
        """Refuse new requests, wait up to ``timeout_s`` for admitted ones to finish, then stop the collector."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._pending_images > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._pending_images > 0:
            _logger.warning("shutting down with %d images still in progress", self._pending_images)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._jobs:
            self._fail(job, ServiceUnavailableError("the server shut down before this request was embedded"))
        self._jobs.clear()
