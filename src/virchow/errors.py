"""Typed errors raised by the toolkit.

Every error a user can cause derives from :class:`VirchowError`, so scripts can catch the whole
family with one clause. Messages name the bad value and the fix. Errors that describe a slide carry
a short machine-readable ``reason`` code that the run manifest records.
"""

from __future__ import annotations


class VirchowError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class ConfigError(VirchowError, ValueError):
    """An option, argument or configuration value is invalid."""


class UnknownModelError(ConfigError):
    """A model name is not in the registry."""


class DeviceError(ConfigError):
    """A requested device or precision is not available on this machine."""


class WeightsError(VirchowError):
    """Model weights could not be found, fetched or loaded."""


class WeightsAccessError(WeightsError):
    """The gated Hugging Face repository or the local copy could not be reached."""


class WeightsFormatError(WeightsError):
    """A weight file is truncated, corrupt or not a checkpoint at all."""


class WeightsMismatchError(WeightsError):
    """A checkpoint's keys or shapes do not match the model architecture."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class ImageDecodeError(VirchowError, ValueError):
    """An image file or payload could not be decoded."""


class NonFiniteEmbeddingError(VirchowError, FloatingPointError):
    """The model produced NaN or Inf values for some images of a batch."""

    def __init__(self, message: str, positions: list[int]) -> None:
        super().__init__(message)
        self.positions = positions


class SlideError(VirchowError):
    """A whole-slide image cannot be processed.

    Attributes:
        reason: short code stored in the run manifest, for example ``no_mpp`` or ``unreadable``.
    """

    reason = "slide_error"


class UnsupportedFormatError(SlideError):
    """No reader backend can open the file."""

    reason = "unsupported_format"


class SlideReadError(SlideError):
    """The slide opened but its pixels or metadata could not be read."""

    reason = "unreadable"


class MissingMppError(SlideError):
    """The slide has no pixel size in its metadata and none was supplied."""

    reason = "no_mpp"


class ResolutionError(SlideError):
    """The slide is too coarse to be tiled at the requested resolution."""

    reason = "insufficient_resolution"


class TileReadError(SlideError):
    """A region of an otherwise readable slide failed to decode."""

    reason = "tile_read_error"


class DataError(VirchowError, ValueError):
    """Tables, labels or feature files given to a downstream command are inconsistent."""


class EmptyBagError(DataError):
    """A slide or specimen bag has no tiles."""


class MissingExtraError(VirchowError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """A slide path given to a reader does not exist."""

    reason = "not_found"
