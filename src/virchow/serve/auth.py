"""Optional API-key authentication with ``Authorization: Bearer KEY``.

Keys come from the ``api_keys`` setting (``VIRCHOW_SERVE_API_KEYS``) and from ``api_keys_file``, one
key per line. With no key configured, authentication is off. A presented key is compared with every
configured key by :func:`hmac.compare_digest`, so the time taken does not reveal how much of a key
matched or which key it was. Keys are never logged; only their count is.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from pathlib import Path

from virchow.errors import ConfigError
from virchow.serve.errors import UnauthorizedError

_logger = logging.getLogger(__name__)


def read_key_file(path: Path) -> list[str]:
    """Read one key per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        ConfigError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class ApiKeyAuth:
    """Check bearer tokens against a fixed set of keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [key.encode("utf-8") for key in dict.fromkeys(keys) if key]
        for key in self._keys:
            if any(byte <= 0x20 or byte == 0x7F for byte in key):
                raise ConfigError("an API key contains whitespace or control characters, which HTTP headers cannot carry")

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> None:
        """Accept the request or raise.

        Raises:
            UnauthorizedError: keys are configured and the header is missing, malformed or has a wrong key.
        """
        if not self._keys:
            return
        if not authorization:
            raise UnauthorizedError("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("malformed Authorization header: use 'Authorization: Bearer <key>'")
        presented = token.strip().encode("utf-8")
        matched = False
        for key in self._keys:
            # Compare with every key, without stopping at a match, so timing does not reveal which key matched.
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise UnauthorizedError("invalid API key")
