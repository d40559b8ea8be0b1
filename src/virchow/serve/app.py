"""The FastAPI app of ``virchow serve``: Azure ML compatible ``POST /score`` plus health, readiness and metrics.

Routes:

- ``POST /score``: embed every row of an Azure ML ``input_data`` request (see :mod:`virchow.serve.schemas`).
- ``GET /`` and ``GET /health``: liveness; 200 as soon as the process serves HTTP.
- ``GET /ready``: 200 once the model is loaded and warmed up, 503 before (and after a failed load).
- ``GET /metrics``: Prometheus text format.
- ``GET /docs``, ``GET /openapi.json``: the OpenAPI description.

With API keys configured, ``/score`` and ``/metrics`` need ``Authorization: Bearer KEY``; the health,
readiness and documentation routes stay open so that probes need no secret.

The model loads in the background after the server starts, on the thread that later runs every
forward pass, so ``/ready`` can respond 503 while it loads.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import numpy as np
from fastapi import FastAPI, Request, Response, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from virchow import __version__
from virchow.embed import Embedder
from virchow.errors import VirchowError
from virchow.models import embedding_shape
from virchow.preprocess import build_transform
from virchow.serve.auth import ApiKeyAuth, read_key_file
from virchow.serve.batching import Batcher, embedder_from_settings, warm_up
from virchow.serve.decode import ImageLimits, raise_pillow_limit
from virchow.serve.errors import (
    BadRequestError,
    GatewayTimeoutError,
    InvalidRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from virchow.serve.fetch import AddressPolicy, ImageFetcher, Resolver
from virchow.serve.inputs import ScoreCall, load_rows, parse_score_body
from virchow.serve.metrics import ServeMetrics
from virchow.serve.middleware import RequestContextMiddleware, current_request_id, install_error_handlers
from virchow.serve.schemas import ErrorResponse, ScoreRequest, ScoreRow
from virchow.serve.settings import ServeSettings

_logger = logging.getLogger(__name__)

EmbedderFactory = Callable[[ServeSettings], Embedder]


def encode_outputs(embeddings: np.ndarray, half_precision: bool) -> bytes:
    """Return the ``[{"output": [...]}, ...]`` JSON body; ``half_precision`` rounds to float16 values first."""
    if half_precision:
        embeddings = embeddings.astype(np.float16).astype(np.float32)
    return json.dumps([{"output": row} for row in embeddings.tolist()], separators=(",", ":")).encode()


class ServeState:
    """Everything a running app owns: settings, model, batcher, executors, fetcher and metrics."""

    def __init__(
        self,
        settings: ServeSettings,
        *,
        auth: ApiKeyAuth,
        embedder: Embedder | None,
        embedder_factory: EmbedderFactory,
        on_load_failure: Callable[[BaseException], None] | None,
        fetch_resolver: Resolver | None,
        fetch_transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.metrics = ServeMetrics()
        self.limits = ImageLimits(
            max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, formats=settings.image_formats
        )

        # One thread owns the model (loading, warm-up, every forward pass); others decode images.
        self.model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="virchow-model")
        self.decode_executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="virchow-decode")

        self.fetcher: ImageFetcher | None = None
        if settings.fetch_urls:
            self.fetcher = ImageFetcher(
                AddressPolicy(settings.fetch_allow),
                connect_timeout_s=settings.fetch_connect_timeout_s,
                total_timeout_s=settings.fetch_timeout_s,
                max_bytes=settings.fetch_size_limit,
                max_redirects=settings.fetch_max_redirects,
                resolver=fetch_resolver,
                transport=fetch_transport,
                on_fetch=self.metrics.record_fetch,
            )

        # Set by _load(): the model, its transform and the batcher exist only once loading succeeded.
        self.embedder = embedder
        self._embedder_factory = embedder_factory
        self._on_load_failure = on_load_failure
        self.transform: Callable | None = None
        self.batcher: Batcher | None = None
        self.load_error: BaseException | None = None
        self._loader: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.batcher is not None

    def start_loading(self) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="virchow-model-load")

    async def _load(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.settings
        try:
            embedder = await loop.run_in_executor(self.model_executor, self._load_and_warm_up)
        except Exception as exc:  # any load failure must reach the log and the readiness probe
            self.load_error = exc
            # A VirchowError (weights not found, unknown model) explains itself; anything else needs its traceback.
            _logger.error("loading the model failed: %s", exc, exc_info=not isinstance(exc, VirchowError))
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        self.embedder = embedder
        self.transform = build_transform(embedder.spec.preprocess)
        batcher = Batcher(
            embedder,
            self.model_executor,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_pending_images=settings.max_pending_images,
            retry_after_s=settings.retry_after_s,
            metrics=self.metrics,
        )
        batcher.start()
        self.batcher = batcher
        self.metrics.ready.set(1)
        _logger.info(
            "model %s ready on %s (%s), default embedding %s, max batch %d",
            embedder.spec.name,
            embedder.device,
            embedder.precision,
            settings.embedding,
            settings.max_batch_size,
        )

    def _load_and_warm_up(self) -> Embedder:
        embedder = self.embedder if self.embedder is not None else self._embedder_factory(self.settings)
        warm_up(embedder, self.settings.max_batch_size)
        return embedder

    async def close(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.batcher is not None:
            await self.batcher.close(self.settings.shutdown_timeout_s)
        if self.fetcher is not None:
            await self.fetcher.aclose()
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        self.model_executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.ready.set(0)
        _logger.info("embedding service stopped")


def create_app(
    settings: ServeSettings | None = None,
    *,
    embedder: Embedder | None = None,
    embedder_factory: EmbedderFactory = embedder_from_settings,
    on_load_failure: Callable[[BaseException], None] | None = None,
    fetch_resolver: Resolver | None = None,
    fetch_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: the service settings; read from ``VIRCHOW_SERVE_*`` variables when None.
        embedder: an already loaded model to serve (tests, notebooks); loaded from the settings when None.
        embedder_factory: loads the model from the settings.
        on_load_failure: called with the exception when the model fails to load, for example to stop the server.
        fetch_resolver: DNS resolver of URL rows; the system resolver when None.
        fetch_transport: httpx transport of URL rows; a direct connection when None.

    Raises:
        ConfigError: the API key file cannot be read or a key cannot be sent in a header.
    """
    settings = settings if settings is not None else ServeSettings()
    keys = [key.get_secret_value() for key in settings.api_keys]
    if settings.api_keys_file is not None:
        keys += read_key_file(settings.api_keys_file)
    auth = ApiKeyAuth(keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        raise_pillow_limit(settings.max_image_pixels)
        state = ServeState(
            settings,
            auth=auth,
            embedder=embedder,
            embedder_factory=embedder_factory,
            on_load_failure=on_load_failure,
            fetch_resolver=fetch_resolver,
            fetch_transport=fetch_transport,
        )
        app.state.serve = state
        _logger.info(
            "embedding service starting: API keys %s, URL rows %s",
            f"required ({state.auth.key_count} configured)" if state.auth.enabled else "not required",
            "accepted" if settings.fetch_urls else "rejected",
        )
        state.start_loading()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="Virchow embedding service",
        version=__version__,
        description="Tile embeddings from the Virchow pathology foundation model, with the Azure ML endpoint schema.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestContextMiddleware, record_request=_request_recorder(app))
    install_error_handlers(app)
    _add_routes(app)
    _install_openapi(app)
    return app


def _request_recorder(app: FastAPI) -> Callable[[str, str, int, float], None]:
    """Return a callback recording request metrics, which exist only once the lifespan has started."""

    def record(route: str, method: str, status: int, seconds: float) -> None:
        state = getattr(app.state, "serve", None)
        if state is not None:
            state.metrics.record_request(route, method, status, seconds)

    return record


_bearer = HTTPBearer(auto_error=False, description="an API key, when the server is configured with keys")


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def require_api_key(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> None:
    """FastAPI dependency: accept the request or raise 401."""
    _state(request).auth.check(request.headers.get("authorization"))


def _add_routes(app: FastAPI) -> None:
    error_responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse} for status in (400, 401, 408, 413, 415, 422, 500, 503, 504)
    }

    @app.get("/", summary="Service information and liveness")
    async def root(request: Request) -> dict[str, Any]:
        state = _state(request)
        settings = state.settings
        info: dict[str, Any] = {
            "service": "virchow-serve",
            "version": __version__,
            "model": settings.model,
            "embedding": settings.embedding,
            "ready": state.ready,
        }
        if state.embedder is not None:
            shape = embedding_shape(settings.embedding, state.embedder.spec.embed_dim, state.embedder.spec.num_patch_tokens)
            info["embedding_shape"] = list(shape)
            info["weights_random"] = state.embedder.provenance.random
        return info

    @app.get("/health", summary="Liveness: 200 while the process serves HTTP")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded and warmed up", responses={503: {"model": ErrorResponse}})
    async def ready(request: Request) -> dict[str, str]:
        state = _state(request)
        if state.ready:
            return {"status": "ready"}
        if state.load_error is not None:
            raise ServiceUnavailableError("the model failed to load; see the server log", code="load_failed", retry_after_s=60)
        raise ServiceUnavailableError("the model is loading", code="not_ready", retry_after_s=state.settings.retry_after_s)

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Security(require_api_key)])
    async def metrics(request: Request) -> Response:
        body, content_type = _state(request).metrics.render()
        return Response(content=body, media_type=content_type)

    @app.post(
        "/score",
        summary="Embed images (Azure ML online endpoint schema)",
        dependencies=[Security(require_api_key)],
        responses={200: {"model": list[ScoreRow]}, **error_responses},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}},
            }
        },
    )
    async def score(request: Request) -> Response:
        return await _score(_state(request), request)


async def _score(state: ServeState, request: Request) -> Response:
    settings = state.settings
    batcher = state.batcher
    if batcher is None:
        if state.load_error is not None:
            raise ServiceUnavailableError("the model failed to load; see the server log", code="load_failed", retry_after_s=60)
        raise ServiceUnavailableError("the model is still loading", code="not_ready", retry_after_s=settings.retry_after_s)

    # Read and parse the body.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.request_timeout_s
    try:
        body = await asyncio.wait_for(read_body(request, settings.max_body_bytes), settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the body was not received within {settings.request_timeout_s:g} s") from None
    # Parsing a body of tens of megabytes takes long enough to stall other requests, so it runs off the loop.
    call = await loop.run_in_executor(state.decode_executor, functools.partial(parse_score_body, body, max_rows=settings.max_rows))
    del body
    kind = call.params.embedding or settings.embedding
    if kind == "patch_tokens" and settings.embedding != "patch_tokens":
        raise InvalidRequestError(
            "params.embedding 'patch_tokens' is served only by a server started with --embedding patch_tokens",
            code="invalid_params",
        )
    _logger.debug(
        "request %s: %d rows, embedding %s, to_half_precision=%s, device_type=%r (ignored: the model stays on %s)",
        current_request_id(),
        len(call.images),
        kind,
        call.params.to_half_precision,
        (call.params.device_type or "")[:32],
        state.embedder.device if state.embedder is not None else "its device",
    )

    # Decode, queue and embed under the admission limit and the request deadline.
    with batcher.admit(len(call.images)):
        try:
            embeddings = await asyncio.wait_for(_embed_call(state, batcher, call, kind), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise GatewayTimeoutError(
                f"the request did not complete within {settings.request_timeout_s:g} s; the server is busy, retry later",
                code="request_timeout",
            ) from None
    content = await loop.run_in_executor(state.decode_executor, encode_outputs, embeddings, call.params.to_half_precision)
    state.metrics.images_embedded.inc(len(call.images))
    return Response(
        content=content,
        media_type="application/json",
        headers={"X-Virchow-Model": settings.model, "X-Virchow-Embedding": kind},
    )


async def _embed_call(state: ServeState, batcher: Batcher, call: ScoreCall, kind: str) -> np.ndarray:
    assert state.transform is not None
    batch = await load_rows(
        call, limits=state.limits, transform=state.transform, executor=state.decode_executor, fetcher=state.fetcher
    )
    return await batcher.embed(batch, kind)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the body, counting streamed bytes against ``max_bytes`` as well as checking Content-Length.

    A body over the limit by no more than the limit itself is read to the end and dropped before the
    413 is sent, so the client finishes sending and can read the response. A larger one gets the 413 at
    once, and the server closes the connection under it.

    Raises:
        BadRequestError: Content-Length is not a number, or the client disconnected.
        PayloadTooLargeError: the body is larger than ``max_bytes``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequestError(f"invalid Content-Length {declared[:40]!r}", code="invalid_content_length")
        if int(declared) > 2 * max_bytes:
            raise PayloadTooLargeError(
                f"the body has {int(declared)} bytes, over the limit of {max_bytes}", code="body_too_large"
            )
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise BadRequestError("the client disconnected before sending the whole body", code="client_disconnected")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received <= max_bytes:
            chunks.append(chunk)
        elif received > 2 * max_bytes:
            break
        if not message.get("more_body", False):
            break
    if received > max_bytes:
        raise PayloadTooLargeError(f"the body is larger than the limit of {max_bytes} bytes", code="body_too_large")
    return b"".join(chunks)


def _install_openapi(app: FastAPI) -> None:
    """Add the ``ScoreRequest`` schema to the components, as ``/score`` parses its body itself."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        request_schema = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in request_schema.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["ScoreRequest"] = request_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["ServeState", "create_app", "embedder_from_settings", "encode_outputs", "read_body"]
