"""Errors of the embedding service and the JSON bodies of their responses.

Every error a client can cause is a :class:`ServeError` with an HTTP status, a short machine-readable
``code`` and a message that names the failing row and the reason. Messages never contain image
payloads, URLs (they can carry access tokens) or API keys, so they are safe to log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from virchow.errors import VirchowError


class ServeError(VirchowError):
    """An error returned with HTTP ``status``. ``row`` is the 0-based row position when one row caused it.

    Attributes:
        status: HTTP status code.
        code: short machine-readable reason, for example ``invalid_base64``.
        row: position of the row in ``input_data.data``, or None for request-level errors.
        index: the row's label from ``input_data.index``, or None.
        headers: extra response headers, for example ``Retry-After``.
    """

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        row: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.row = row
        self.index: Any = None
        self.headers = dict(headers or {})

    def for_row(self, row: int, index: Any) -> ServeError:
        """Attach the row position and label; returns self."""
        self.row = row
        self.index = index
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of one error."""
        entry: dict[str, Any] = {"status": self.status, "code": self.code, "message": self.message}
        if self.row is not None:
            entry["row"] = self.row
            entry["index"] = self.index
        return entry


class BadRequestError(ServeError):
    """The body or a row is malformed: invalid JSON, invalid base64, a corrupt image, a bad URL."""

    status = 400
    code = "bad_request"


class UnauthorizedError(ServeError):
    """The request has no API key or a wrong one."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="virchow"'})


class RequestTimeoutError(ServeError):
    """The client did not send the whole body in time."""

    status = 408
    code = "body_timeout"


class PayloadTooLargeError(ServeError):
    """The body, the row count, an image file or an image's pixel count is over its limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServeError):
    """A row is not an image, or its format is not accepted."""

    status = 415
    code = "unsupported_image_format"


class InvalidRequestError(ServeError):
    """The JSON is valid but does not follow the request schema."""

    status = 422
    code = "invalid_request"


class ServiceUnavailableError(ServeError):
    """The model is not ready, the queue is full or the server is shutting down."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class GatewayTimeoutError(ServeError):
    """The request, or the download of one of its URLs, took longer than its limit."""

    status = 504
    code = "timeout"


class FailedRowsError(ServeError):
    """Several rows failed; the response status is that of the first failing row."""

    def __init__(self, errors: Sequence[ServeError]) -> None:
        ordered = sorted(errors, key=lambda error: -1 if error.row is None else error.row)
        first = ordered[0]
        more = f" ({len(ordered) - 1} more rows failed, see 'errors')" if len(ordered) > 1 else ""
        super().__init__(first.message + more, code=first.code, row=first.row, headers=first.headers)
        self.status = first.status
        self.index = first.index
        self.errors = ordered


def error_body(error: ServeError, request_id: str | None) -> dict[str, Any]:
    """Return the JSON body of an error response.

    The shape is ``{"status", "code", "message", "row", "index", "errors", "request_id"}``. ``message``
    is the key the Azure ML inference server uses for its own errors, so clients written for it read
    ours too. ``errors`` lists every failing row, ``row`` is the first of them or null.
    """
    if isinstance(error, FailedRowsError):
        rows = error.errors
    elif error.row is not None:
        rows = [error]
    else:
        rows = []
    return {
        "status": error.status,
        "code": error.code,
        "message": error.message,
        "row": error.row,
        "index": error.index,
        "errors": [row_error.to_dict() for row_error in rows],
        "request_id": request_id,
    }


def internal_error_body(request_id: str | None) -> dict[str, Any]:
    """Return the generic body of a 500 response; the details go to the log, never to the client."""
    return {
        "status": 500,
        "code": "internal_error",
        "message": f"internal server error; the server log has the details under request id {request_id}",
        "row": None,
        "index": None,
        "errors": [],
        "request_id": request_id,
    }
