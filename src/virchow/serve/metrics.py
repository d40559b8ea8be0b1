"""Prometheus metrics of the embedding service, in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServeMetrics:
    """Request, batching, queue and download metrics.

    A separate :class:`CollectorRegistry` per app keeps several apps in one process (tests) apart.
    Route labels are route templates or ``other``, so unknown paths cannot grow the label set.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "virchow_serve_requests",
            "HTTP requests by route, method and status code",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "virchow_serve_request_duration_seconds",
            "HTTP request latency by route, from the first byte received to the last byte sent",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "virchow_serve_batch_size_images", "images per forward pass", buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.inference_seconds = Histogram(
            "virchow_serve_inference_duration_seconds",
            "duration of one forward pass, pooling included",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "virchow_serve_queue_depth_images", "decoded images waiting for the model", registry=self.registry
        )
        self.pending_images = Gauge(
            "virchow_serve_pending_images", "images admitted and not yet returned", registry=self.registry
        )
        self.rejected_overload = Counter(
            "virchow_serve_overload_rejections", "requests rejected with 503 because the queue was full", registry=self.registry
        )
        self.images_embedded = Counter(
            "virchow_serve_images_embedded", "images embedded and returned", registry=self.registry
        )
        self.images_fetched = Counter(
            "virchow_serve_images_fetched",
            "URL rows by outcome: ok, rejected (address policy or invalid URL), too_large, timeout, failed",
            ("outcome",),
            registry=self.registry,
        )
        self.ready = Gauge("virchow_serve_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def record_fetch(self, outcome: str) -> None:
        self.images_fetched.labels(outcome=outcome).inc()

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
