"""Serve tile embeddings over HTTP with the Azure ML online endpoint schema (POST /score).

Model options, --host and --port are flags. Every other setting (limits, batching, URL fetching,
API keys) is read from a VIRCHOW_SERVE_<NAME> environment variable or given as --set NAME=VALUE;
flags and --set take precedence over the environment. docs/serving.md describes the API.

Example:
    VIRCHOW_SERVE_API_KEYS_FILE=/etc/virchow/keys virchow serve --weights /models/virchow --port 8000
    curl -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \\
         -d '{"input_data": {"columns": ["image"], "data": [["<base64 PNG>"]]}}' http://127.0.0.1:8000/score
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING

from pydantic import ValidationError

from virchow.cli._common import add_model_arguments
from virchow.errors import ConfigError

if TYPE_CHECKING:
    from virchow.serve.settings import ServeSettings

HELP = "serve embeddings over HTTP (Azure ML endpoint schema)"

_logger = logging.getLogger(__name__)

# Flags of add_model_arguments that map to settings; unset flags fall back to VIRCHOW_SERVE_* variables.
_MODEL_FLAGS = {
    "model": "model",
    "weights": "weights",
    "device": "device",
    "precision": "precision",
    "embedding": "embedding",
    "batch_size": "max_batch_size",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from virchow.serve.settings import settings_help

    add_model_arguments(parser)
    # None marks "not given", so the settings read the environment; the help texts name the real defaults.
    parser.set_defaults(**dict.fromkeys(_MODEL_FLAGS), compile=None)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=None, help="address to listen on (default: 127.0.0.1, this machine only)")
    group.add_argument("--port", type=int, default=None, help="TCP port (default: 8000)")
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any setting listed below, for example --set max_rows=64 --set fetch_allow=tiles.internal,10.0.0.0/8",
    )
    group.add_argument("--print-settings", action="store_true", help="print the resolved settings as JSON and exit")
    parser.epilog = "settings (NAME, environment variable, default):\n" + settings_help()


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for flag, name in _MODEL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[name] = value
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    for item in args.settings:
        name, separator, value = item.partition("=")
        if not separator or not name.strip():
            raise ConfigError(f"invalid --set {item!r}: use NAME=VALUE, for example --set max_rows=64")
        overrides[name.strip()] = value.strip()
    return overrides


def load_settings(args: argparse.Namespace) -> ServeSettings:
    """Build the settings from the flags, ``--set`` and the environment.

    Raises:
        ConfigError: a value is invalid; the message names the setting.
    """
    from virchow.serve.settings import ServeSettings

    try:
        return ServeSettings(**_overrides(args))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise ConfigError(f"invalid serve settings: {problems}") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from virchow.serve.app import create_app

    settings = load_settings(args)
    if args.print_settings:
        print(json.dumps(settings.describe(), indent=2))
        return 0
    if getattr(args, "compile", None) == "on":
        _logger.warning("--compile on is ignored: the server runs the eager model at every batch size")

    if not settings.is_loopback_host() and not (settings.api_keys or settings.api_keys_file):
        _logger.warning("listening on %s without API keys: anyone who can reach this port can use the model", settings.host)

    load_failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_failure(exc: BaseException) -> None:
        load_failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop_on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        _logger.error("the server did not start; the messages above give the cause")
        return 1
    if load_failure:
        _logger.error("the server stopped because the model failed to load: %s", load_failure[0])
        return 1
    return 0
