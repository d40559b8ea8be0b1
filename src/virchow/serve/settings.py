"""Settings of the embedding service, read from keyword arguments and ``VIRCHOW_SERVE_*`` variables.

Keyword arguments (the command line passes the flags it was given) take precedence over environment
variables, which take precedence over the defaults below. List settings accept JSON
(``'["a", "b"]'``) or comma-separated text (``a,b``) in environment variables.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "VIRCHOW_SERVE_"
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
_MIB = 1024 * 1024


def _default_decode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class _CommaListEnvSource(EnvSettingsSource):
    """Environment source that also reads list settings as comma-separated text."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return json.loads(value)
        except ValueError:
            return [item.strip() for item in str(value).split(",") if item.strip()]


class ServeSettings(BaseSettings):
    """Model, network, batching, input limits, URL fetching and authentication of ``virchow serve``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # Model.
    model: str = Field("virchow", description="registered model variant")
    weights: str | None = Field(
        None, description="weights as for `--weights`; unset means the variant's official Hugging Face repository"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="autocast precision")
    embedding: Literal["cls+mean", "cls", "mean", "patch_tokens"] = Field(
        "cls+mean", description="embedding kind returned when a request does not choose one"
    )

    # Network.
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 listens on every interface")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one")

    # Batching and queueing.
    max_batch_size: int = Field(32, ge=1, description="images per forward pass, across concurrent requests")
    max_wait_ms: float = Field(
        5.0, ge=0, description="how long the first queued image waits for others to fill a batch, in milliseconds"
    )
    max_pending_images: int = Field(
        256, ge=1, description="images admitted (being decoded or queued) at once; more are rejected with 503"
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="seconds a request may spend reading its body, decoding and queueing before a 504"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After value of 503 responses, in seconds")
    shutdown_timeout_s: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on shutdown")
    decode_threads: int = Field(
        default_factory=_default_decode_threads, ge=1, description="threads decoding and transforming images"
    )

    # Input limits.
    max_body_bytes: int = Field(64 * _MIB, ge=1024, description="request body size limit in bytes")
    max_rows: int = Field(128, ge=1, description="rows (images) per request")
    max_image_bytes: int = Field(16 * _MIB, ge=1, description="size limit of one encoded image file in bytes")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="width x height limit, checked from the image header before decoding"
    )
    image_formats: tuple[str, ...] = Field(DEFAULT_IMAGE_FORMATS, description="accepted image formats (Pillow names)")

    # URL inputs.
    fetch_urls: bool = Field(True, description="accept http(s) URLs as rows")
    fetch_allow: tuple[str, ...] = Field(
        (),
        description="destinations allowed despite the address policy: HOST, HOST:PORT, *.DOMAIN, IP, IP:PORT, "
        "[IPv6]:PORT or CIDR",
    )
    fetch_connect_timeout_s: float = Field(5.0, gt=0, description="TCP and TLS connect timeout of a URL download")
    fetch_timeout_s: float = Field(20.0, gt=0, description="total time limit of a URL download, redirects included")
    fetch_max_bytes: int | None = Field(None, ge=1, description="size limit of a downloaded image; unset: max_image_bytes")
    fetch_max_redirects: int = Field(3, ge=0, description="redirects followed per URL")

    # Authentication.
    api_keys: tuple[SecretStr, ...] = Field((), description="accepted API keys (Authorization: Bearer KEY)")
    api_keys_file: Path | None = Field(None, description="file with one API key per line; '#' starts a comment")

    # Logging.
    access_log: bool = Field(True, description="log one line per request (method, path, status; never bodies)")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _CommaListEnvSource(settings_cls), dotenv_settings, file_secret_settings)

    @field_validator("image_formats", "fetch_allow", "api_keys", mode="before")
    @classmethod
    def _split_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("image_formats")
    @classmethod
    def _check_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        Image.init()
        formats = tuple(_FORMAT_ALIASES.get(name.upper(), name.upper()) for name in value)
        unknown = [name for name in formats if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"unknown image formats {unknown}; Pillow here opens {', '.join(sorted(Image.OPEN))}")
        if not formats:
            raise ValueError("image_formats must name at least one format, for example PNG")
        return formats

    @field_validator("fetch_allow")
    @classmethod
    def _check_allow(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from virchow.serve.fetch import parse_allow_entry

        for entry in value:
            parse_allow_entry(entry)
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeSettings:
        if self.max_pending_images < self.max_rows:
            raise ValueError(
                f"max_pending_images ({self.max_pending_images}) must be at least max_rows ({self.max_rows}), "
                "or a request with max_rows images could never be admitted"
            )
        return self

    @property
    def fetch_size_limit(self) -> int:
        """Size limit of one downloaded image in bytes."""
        return self.fetch_max_bytes if self.fetch_max_bytes is not None else self.max_image_bytes

    def is_loopback_host(self) -> bool:
        """Return True when ``host`` accepts connections from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def describe(self) -> dict[str, Any]:
        """Return the settings as JSON-compatible values with API keys masked, for logs and ``--print-settings``."""
        values = self.model_dump(mode="json")
        values["api_keys"] = [f"<{len(self.api_keys)} keys>"] if self.api_keys else []
        return values


def settings_help() -> str:
    """Return one line per setting with its environment variable and default, for ``--help``."""
    lines = []
    for name, field in ServeSettings.model_fields.items():
        if field.default_factory is not None:
            default = "depends on the machine"
        else:
            default = field.default
            if isinstance(default, tuple):
                default = ",".join(default) if default else "empty"
        lines.append(f"  {name:<24} {ENV_PREFIX}{name.upper()}  (default: {default})\n      {field.description}")
    return "\n".join(lines)
