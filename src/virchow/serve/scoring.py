"""Azure ML scoring script: ``init()`` and ``run(raw_data)`` for ``azureml-inference-server-http``.

It serves the same ``/score`` schema as ``virchow serve`` (every row embedded, in row order, with the
same limits and URL address policy), so a managed online endpoint can run it with Azure's own server.
The settings are the ``VIRCHOW_SERVE_*`` environment variables. Without ``VIRCHOW_SERVE_WEIGHTS`` the
weights are the one Hugging Face style directory (``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin``) found under ``AZUREML_MODEL_DIR``, the folder where Azure mounts the
registered model, and the variant is read from its ``config.json`` unless ``VIRCHOW_SERVE_MODEL`` is set.

Azure's server runs one request at a time per worker process and checks API keys itself, so this
script has no batching queue and no authentication. Client errors are returned as an ``AMLResponse``
with the fitting status and the JSON error body of ``virchow serve``. docs/azure-deployment.md shows
a deployment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from virchow.errors import ConfigError
from virchow.models import get_model_spec, list_models
from virchow.models.weights import HF_WEIGHT_FILES
from virchow.preprocess import build_transform
from virchow.serve.batching import embed_direct, embedder_from_settings, warm_up
from virchow.serve.decode import ImageLimits, raise_pillow_limit
from virchow.serve.errors import InvalidRequestError, PayloadTooLargeError, ServeError, error_body
from virchow.serve.fetch import AddressPolicy, ImageFetcher
from virchow.serve.inputs import load_rows, parse_score_body
from virchow.serve.middleware import log_level
from virchow.serve.settings import ServeSettings

_logger = logging.getLogger(__name__)

MODEL_DIR_VARIABLE = "AZUREML_MODEL_DIR"
_SEARCH_DEPTH = 3

_service: ScoringService | None = None


def find_weights_directory(model_dir: Path) -> Path:
    """Return the one directory under ``model_dir`` (at most three levels down) holding Hugging Face style weights.

    Raises:
        ConfigError: no such directory, or several; the message names the setting that chooses one.
    """
    configs = [model_dir / "config.json"]
    for depth in range(1, _SEARCH_DEPTH + 1):
        configs += sorted(model_dir.glob("*/" * depth + "config.json"))
    candidates = [
        config.parent
        for config in configs
        if config.is_file() and any((config.parent / name).is_file() for name in HF_WEIGHT_FILES)
    ]
    if not candidates:
        raise ConfigError(
            f"no config.json with {' or '.join(HF_WEIGHT_FILES)} under {model_dir}: register the model folder "
            "written by virchow.models.export.save_pretrained, or set VIRCHOW_SERVE_WEIGHTS"
        )
    if len(candidates) > 1:
        listed = ", ".join(str(path) for path in candidates)
        raise ConfigError(f"several weight directories under {model_dir} ({listed}): set VIRCHOW_SERVE_WEIGHTS to one")
    return candidates[0]


def model_name_from_config(directory: Path) -> str | None:
    """Return the registered variant whose tag matches ``pretrained_cfg.tag`` of ``directory/config.json``."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    tag = config.get("pretrained_cfg", {}).get("tag") if isinstance(config, dict) else None
    return next((name for name in list_models() if tag and get_model_spec(name).tag == tag), None)


class ScoringService:
    """The loaded model and everything ``run()`` needs."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.embedder = embedder_from_settings(settings)
        warm_up(self.embedder, settings.max_batch_size)
        self.transform = build_transform(self.embedder.spec.preprocess)
        self.limits = ImageLimits(
            max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, formats=settings.image_formats
        )
        self.policy = AddressPolicy(settings.fetch_allow)
        self.executor = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="virchow-decode")
        raise_pillow_limit(settings.max_image_pixels)

    def score(self, raw_data: str | bytes) -> list[dict[str, Any]]:
        """Embed every row of a ``/score`` body.

        Raises:
            ServeError: the request is invalid or a row failed; the status and message name the cause.
        """
        settings = self.settings
        if len(raw_data) > settings.max_body_bytes:
            raise PayloadTooLargeError(
                f"the body has {len(raw_data)} bytes, over the limit of {settings.max_body_bytes}", code="body_too_large"
            )
        call = parse_score_body(raw_data, max_rows=settings.max_rows)
        kind = call.params.embedding or settings.embedding
        if kind == "patch_tokens" and settings.embedding != "patch_tokens":
            raise InvalidRequestError(
                "params.embedding 'patch_tokens' is served only when VIRCHOW_SERVE_EMBEDDING is patch_tokens",
                code="invalid_params",
            )
        batch = asyncio.run(self._load(call))
        embeddings = embed_direct(self.embedder, batch, kind, settings.max_batch_size)
        if call.params.to_half_precision:
            embeddings = embeddings.astype("float16").astype("float32")
        return [{"output": row} for row in embeddings.tolist()]

    async def _load(self, call: Any):
        settings = self.settings
        fetcher = None
        if settings.fetch_urls:
            # A new client per call: asyncio.run() gives every call its own event loop.
            fetcher = ImageFetcher(
                self.policy,
                connect_timeout_s=settings.fetch_connect_timeout_s,
                total_timeout_s=settings.fetch_timeout_s,
                max_bytes=settings.fetch_size_limit,
                max_redirects=settings.fetch_max_redirects,
            )
        try:
            return await load_rows(call, limits=self.limits, transform=self.transform, executor=self.executor, fetcher=fetcher)
        finally:
            if fetcher is not None:
                await fetcher.aclose()


def init() -> None:
    """Load the model; Azure's server calls this once per worker process."""
    global _service
    settings = ServeSettings()
    updates: dict[str, Any] = {}
    model_dir = os.environ.get(MODEL_DIR_VARIABLE)
    if settings.weights is None and model_dir:
        weights_dir = find_weights_directory(Path(model_dir))
        updates["weights"] = str(weights_dir)
        if "model" not in settings.model_fields_set:
            detected = model_name_from_config(weights_dir)
            if detected is not None:
                updates["model"] = detected
    settings = settings.model_copy(update=updates)
    _logger.info("loading model %s from %s", settings.model, settings.weights or "its official repository")
    _service = ScoringService(settings)
    _logger.info("model %s ready on %s", settings.model, _service.embedder.device)


def run(raw_data: str) -> Any:
    """Embed the rows of a ``/score`` body; returns ``[{"output": [...]}, ...]`` in row order.

    Inside Azure's server a client error comes back as an ``AMLResponse`` with the error's status and
    JSON body. Called directly, without that server installed, the :class:`ServeError` is raised.
    """
    if _service is None:
        raise RuntimeError("run() was called before init()")
    try:
        return _service.score(raw_data)
    except ServeError as exc:
        _logger.log(log_level(exc), "scoring request failed: %d %s: %s", exc.status, exc.code, exc.message)
        response_class = _aml_response_class()
        if response_class is None:
            raise
        return response_class(error_body(exc, None), exc.status, dict(exc.headers), json_str=True)


def _aml_response_class() -> Any:
    """Return ``AMLResponse`` of the installed Azure ML inference server, or None outside it."""
    try:
        from azureml_inference_server_http.api.aml_response import AMLResponse
    except ImportError:
        try:
            from azureml.contrib.services.aml_response import AMLResponse
        except ImportError:
            return None
    return AMLResponse
