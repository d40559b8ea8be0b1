"""Request ids, request metrics, and the mapping of exceptions to JSON error responses."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from virchow.serve.errors import ServeError, error_body, internal_error_body

_logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("virchow_request_id", default=None)


def current_request_id() -> str | None:
    """Return the id of the request being handled, or None outside a request."""
    return request_id_var.get()


class RequestContextMiddleware:
    """Pure ASGI middleware: assign a request id, record metrics, and respond 500 to unhandled errors.

    ``record_request(route, method, status, seconds)`` is called once per HTTP request.

    A client's ``X-Request-ID`` is kept when it is 1 to 64 characters of ``[A-Za-z0-9._:-]``, else a
    random id is made. The id is returned in ``X-Request-ID`` and named in error bodies and logs.
    """

    def __init__(self, app: ASGIApp, record_request: Callable[[str, str, int, float], None]) -> None:
        self.app = app
        self.record_request = record_request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _request_id_from(scope)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("ascii"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            _logger.exception("unhandled error in request %s %s (request id %s)", scope["method"], scope["path"], request_id)
            if not response_started:
                status = 500
                body = json.dumps(internal_error_body(request_id)).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode("ascii")),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            self.record_request(route, scope["method"], status, time.perf_counter() - started)
            request_id_var.reset(token)


def _request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def log_level(error: ServeError) -> int:
    """Return the log level of an error response: client errors INFO, overload WARNING, server faults ERROR."""
    if error.status in (503, 504):
        return logging.WARNING
    return logging.ERROR if error.status >= 500 else logging.INFO


class RepeatLimiter:
    """Let one log record per key through every ``interval_s`` seconds and count the ones held back.

    Overload responses (503, 504) come in floods under load. One line per code and interval, with the
    number held back, keeps the log readable. The metrics count every response.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """Return whether to log now and how many records of ``key`` were held back since the last one."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is None or now - last >= self.interval_s:
            self._last[key] = now
            return True, self._held_back.pop(key, 0)
        self._held_back[key] = self._held_back.get(key, 0) + 1
        return False, 0


def log_error_response(error: ServeError, request_id: str | None, limiter: RepeatLimiter) -> None:
    """Log an error response sent to the client; 503 and 504 are rate-limited per code."""
    level = log_level(error)
    if error.status in (503, 504):
        allowed, held_back = limiter.allow(error.code)
        if not allowed:
            return
        if held_back:
            _logger.log(level, "%d more %d %s responses were not logged since the previous one", held_back, error.status, error.code)
    _logger.log(level, "request %s: %d %s: %s", request_id, error.status, error.code, error.message)


def install_error_handlers(app: FastAPI) -> None:
    """Respond to :class:`ServeError` and routing errors (404, 405) with the JSON error body."""

    limiter = RepeatLimiter()

    async def serve_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServeError)
        request_id = current_request_id()
        log_error_response(exc, request_id, limiter)
        return JSONResponse(error_body(exc, request_id), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        request_id = current_request_id()
        codes = {404: "not_found", 405: "method_not_allowed"}
        body: dict[str, Any] = {
            "status": exc.status_code,
            "code": codes.get(exc.status_code, "http_error"),
            "message": str(exc.detail),
            "row": None,
            "index": None,
            "errors": [],
            "request_id": request_id,
        }
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
