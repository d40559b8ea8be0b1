"""Request and response models of ``POST /score``, the Azure ML real-time endpoint schema.

The request is a pandas ``split``-orient frame with the single column ``image``, as the MLflow
signature of the Azure ML Virchow models declares, plus optional parameters::

    {"input_data": {"columns": ["image"], "index": [0, 1], "data": [["<base64 or URL>"], ["..."]]},
     "params": {"device_type": "cuda", "to_half_precision": false, "embedding": "cls+mean"}}

``data`` may also be flat (``["<base64>", "<base64>"]``). The response has one object per row, in
row order: ``[{"output": [f0, f1, ...]}, ...]``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGE_COLUMN = "image"


class InputData(BaseModel):
    """The rows: one image per row, as base64 (optionally a ``data:`` URI) or an http(s) URL."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(default=[IMAGE_COLUMN], description='must be ["image"]')
    index: list[int | str] | None = Field(default=None, description="row labels echoed in errors; 0..N-1 if absent")
    data: list[str | list[str]] = Field(
        description='rows, nested ([["<image>"], ...]) or flat (["<image>", ...])',
        examples=[[["iVBORw0KGgo..."], ["https://example.org/tile.png"]]],
    )


class ScoreParams(BaseModel):
    """Parameters; ``device_type`` is accepted for compatibility and does not move the model."""

    model_config = ConfigDict(extra="forbid")

    device_type: str | None = Field(default=None, description="accepted and ignored: the server's device is fixed")
    to_half_precision: bool = Field(default=False, description="round the outputs to float16 values")
    embedding: Literal["cls+mean", "cls", "mean", "patch_tokens"] | None = Field(
        default=None, description="embedding kind of this request; the server's default if absent"
    )


class ScoreRequest(BaseModel):
    """Body of ``POST /score``."""

    model_config = ConfigDict(extra="forbid")

    input_data: InputData
    params: ScoreParams = Field(default_factory=ScoreParams)


class ScoreRow(BaseModel):
    """Embedding of one row; a list of lists for ``patch_tokens``."""

    output: list[float] | list[list[float]]


class RowErrorModel(BaseModel):
    """One failing row."""

    status: int
    code: str
    message: str
    row: int
    index: int | str | None = None


class ErrorResponse(BaseModel):
    """Body of every error response; ``row`` and ``index`` name the first failing row, if any."""

    status: int
    code: str
    message: str
    row: int | None = None
    index: int | str | None = None
    errors: list[RowErrorModel] = Field(default_factory=list)
    request_id: str | None = None
