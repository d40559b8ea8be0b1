"""From a ``/score`` body to a batch of model inputs; shared by the FastAPI app and the Azure scoring script.

:func:`parse_score_body` checks the JSON against the schema and the row limit. :func:`load_rows`
turns every row (base64 or URL) into a normalised (3, H, W) tensor through the official transform,
decoding in a thread pool. Errors name the failing rows; every row is tried, so one response lists
all the rows that failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError

from virchow.serve.decode import ImageLimits, decode_base64, is_url, open_image
from virchow.serve.errors import (
    BadRequestError,
    FailedRowsError,
    InvalidRequestError,
    PayloadTooLargeError,
    ServeError,
)
from virchow.serve.fetch import ImageFetcher
from virchow.serve.schemas import IMAGE_COLUMN, ScoreParams, ScoreRequest

_logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
_MAX_SCHEMA_MESSAGES = 5


@dataclass
class ScoreCall:
    """A validated ``/score`` request.

    Attributes:
        images: one base64 or URL string per row.
        index: the row labels, ``input_data.index`` or 0..N-1.
        params: the request parameters.
    """

    images: list[str]
    index: list[Any]
    params: ScoreParams


def parse_score_body(body: bytes | str, *, max_rows: int) -> ScoreCall:
    """Parse and validate a ``/score`` body.

    Raises:
        BadRequestError: the body is not UTF-8 JSON.
        InvalidRequestError: the JSON does not follow the schema; row errors name their rows.
        PayloadTooLargeError: there are more than ``max_rows`` rows.
    """
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise BadRequestError("the body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise InvalidRequestError(f"the body must be a JSON object with 'input_data', not a {type(payload).__name__}")

    # Count rows before validating them all, so a huge request fails fast.
    input_data = payload.get("input_data")
    rows = input_data.get("data") if isinstance(input_data, dict) else None
    if isinstance(rows, list):
        _check_row_count(len(rows), max_rows)
    labels = input_data.get("index") if isinstance(input_data, dict) else None

    try:
        request = ScoreRequest.model_validate(payload)
    except ValidationError as exc:
        raise _schema_error(exc, labels) from None

    data = request.input_data
    if data.columns != [IMAGE_COLUMN]:
        columns_text = json.dumps(data.columns)[:200]
        raise InvalidRequestError(f'input_data.columns must be ["{IMAGE_COLUMN}"], got {columns_text}', code="invalid_columns")
    if not data.data:
        raise InvalidRequestError("input_data.data has no rows: send at least one image", code="no_rows")
    index = list(data.index) if data.index is not None else list(range(len(data.data)))
    if len(index) != len(data.data):
        raise InvalidRequestError(
            f"input_data.index has {len(index)} labels but input_data.data has {len(data.data)} rows", code="invalid_index"
        )

    images: list[str] = []
    errors: list[ServeError] = []
    for position, row in enumerate(data.data):
        if isinstance(row, list):
            if len(row) != 1:
                error = InvalidRequestError(f"row {position} has {len(row)} values; expected 1 (the image column)")
                errors.append(error.for_row(position, index[position]))
                continue
            row = row[0]
        if not row:
            errors.append(InvalidRequestError(f"row {position} is an empty string").for_row(position, index[position]))
            continue
        images.append(row)
    if errors:
        raise FailedRowsError(errors)
    return ScoreCall(images=images, index=index, params=request.params)


def _check_row_count(count: int, max_rows: int) -> None:
    if count > max_rows:
        raise PayloadTooLargeError(
            f"the request has {count} rows, over the limit of {max_rows}: split it into several requests",
            code="too_many_rows",
        )


def _schema_error(exc: ValidationError, labels: Any) -> ServeError:
    """Turn pydantic errors into one 422, or per-row 422s when they concern rows of ``input_data.data``."""
    row_errors: dict[int, ServeError] = {}
    messages: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        location = error["loc"]
        path = ".".join(str(part) for part in location)
        if location[:2] == ("input_data", "data") and len(location) > 2 and isinstance(location[2], int):
            position = location[2]
            if position not in row_errors:
                message = f"row {position} must be a string (base64 or URL) or a list holding one"
                label = labels[position] if isinstance(labels, list) and position < len(labels) else position
                row_errors[position] = InvalidRequestError(message).for_row(position, label)
            continue
        messages.append(f"{path or 'body'}: {error['msg']}")
    if row_errors:
        return FailedRowsError(list(row_errors.values()))
    summary = "; ".join(messages[:_MAX_SCHEMA_MESSAGES])
    if len(messages) > _MAX_SCHEMA_MESSAGES:
        summary += f"; and {len(messages) - _MAX_SCHEMA_MESSAGES} more"
    return InvalidRequestError(f"the request does not follow the /score schema: {summary}")


async def load_rows(
    call: ScoreCall,
    *,
    limits: ImageLimits,
    transform: Transform,
    executor: Executor | None,
    fetcher: ImageFetcher | None,
) -> torch.Tensor:
    """Decode every row and return the normalised batch (N, 3, H, W).

    Args:
        call: the parsed request.
        limits: size and format limits of each image.
        transform: the model's official PIL-to-tensor transform.
        executor: where decoding runs; None means the event loop's default executor.
        fetcher: downloads URL rows; None rejects them.

    Raises:
        FailedRowsError: some rows failed; it lists every failing row.
    """
    loop = asyncio.get_running_loop()

    def decode(data: str | bytes) -> torch.Tensor:
        raw = decode_base64(data, limits.max_bytes) if isinstance(data, str) else data
        return transform(open_image(raw, limits))

    async def load_one(position: int, text: str) -> torch.Tensor | ServeError:
        try:
            if is_url(text):
                if fetcher is None:
                    raise BadRequestError("URL rows are disabled on this server: send base64 data", code="urls_disabled")
                data: str | bytes = await fetcher.fetch(text)
            else:
                data = text
            return await loop.run_in_executor(executor, decode, data)
        except ServeError as exc:
            return exc.for_row(position, call.index[position])

    results = await asyncio.gather(*(load_one(position, text) for position, text in enumerate(call.images)))
    errors = [result for result in results if isinstance(result, ServeError)]
    if errors:
        raise FailedRowsError(errors)
    return torch.stack(results)  # type: ignore[arg-type]
