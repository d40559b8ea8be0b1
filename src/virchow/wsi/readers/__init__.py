"""Slide readers and the :func:`open_slide` factory that picks a backend per file.

Backend order for ``backend="auto"``:

* ``.png``, ``.jpg``, ``.jpeg``: Pillow.
* ``.ome.tif``, ``.ome.tiff``: tifffile (reads the OME pixel size and SubIFD pyramids), then OpenSlide.
* ``.svs``, ``.tif``, ``.tiff``, ``.ndpi``, ``.scn``, ``.bif``: OpenSlide, then tifffile.
* ``.mrxs``, ``.vms``, ``.vmu``, ``.svslide``, ``.dcm``: OpenSlide only.
* ``.btf``, ``.tf8`` (BigTIFF): tifffile only.

A backend is used only if it opens the file and decodes a small region of its smallest level.
Every fallback to the next backend is logged as a WARNING with the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from virchow.errors import SlideError, SlideNotFoundError, SlideReadError, UnsupportedFormatError
from virchow.wsi.readers.base import SlideReader
from virchow.wsi.readers.image_reader import ImageReader
from virchow.wsi.readers.openslide_reader import OpenSlideReader
from virchow.wsi.readers.tiff_reader import TiffReader

logger = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "tifffile", "pil"]

_READERS: dict[str, type[SlideReader]] = {"openslide": OpenSlideReader, "tifffile": TiffReader, "pil": ImageReader}

_BACKENDS_BY_EXTENSION: dict[str, tuple[str, ...]] = {
    ".png": ("pil",),
    ".jpg": ("pil",),
    ".jpeg": ("pil",),
    ".ome.tif": ("tifffile", "openslide"),
    ".ome.tiff": ("tifffile", "openslide"),
    ".svs": ("openslide", "tifffile"),
    ".tif": ("openslide", "tifffile"),
    ".tiff": ("openslide", "tifffile"),
    ".ndpi": ("openslide", "tifffile"),
    ".scn": ("openslide", "tifffile"),
    ".bif": ("openslide", "tifffile"),
    ".mrxs": ("openslide",),
    ".vms": ("openslide",),
    ".vmu": ("openslide",),
    ".svslide": ("openslide",),
    ".dcm": ("openslide",),
    ".btf": ("tifffile",),
    ".tf8": ("tifffile",),
}

#: File name endings :func:`open_slide` accepts, lower case.
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(sorted(_BACKENDS_BY_EXTENSION))

#: Side of the square region decoded to check that a backend can read a file, in pixels.
_PROBE_SIZE = 256


def slide_extension(path: str | Path) -> str:
    """Return the lower-case extension of ``path``, with ``.ome.tif``/``.ome.tiff`` kept whole."""
    name = Path(path).name.lower()
    for double in (".ome.tif", ".ome.tiff"):
        if name.endswith(double):
            return double
    return Path(name).suffix


def is_supported(path: str | Path) -> bool:
    """Return True when the extension of ``path`` is in :data:`SUPPORTED_EXTENSIONS`."""
    return slide_extension(path) in _BACKENDS_BY_EXTENSION


def _probe(reader: SlideReader) -> None:
    """Check that ``reader`` can decode its smallest level.

    Small regions at the centre and at the centres of the top-left and bottom-right quarters are
    decoded. One success is enough: a codec the backend lacks fails everywhere, while a damaged
    tile fails in one place and is left to per-tile error handling (a WARNING is logged).

    Raises:
        SlideError: every probe region failed; the error of the first one.
    """
    level = reader.level_count - 1
    width, height = reader.level_dimensions[level]
    size = (min(_PROBE_SIZE, width), min(_PROBE_SIZE, height))
    downsample = reader.level_downsamples[level]
    failures: list[SlideError] = []
    for fraction_x, fraction_y in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.75)):
        x_level = min(max(0, int(width * fraction_x) - size[0] // 2), width - size[0])
        y_level = min(max(0, int(height * fraction_y) - size[1] // 2), height - size[1])
        try:
            reader.read_region((round(x_level * downsample), round(y_level * downsample)), level, size)
        except SlideError as exc:
            failures.append(exc)
            continue
        if failures:
            logger.warning(
                "%s: part of the slide failed to decode and may be damaged: %s", reader.path.name, failures[0]
            )
        return
    raise failures[0]


def open_slide(path: str | Path, *, mpp: float | None = None, backend: Backend = "auto") -> SlideReader:
    """Open a whole-slide image with the first backend that can read it.

    Args:
        path: slide file. For DICOM, one ``.dcm`` file of the series (the level-0 file is safest).
        mpp: level-0 pixel size override in um/px, replacing the metadata value.
        backend: ``"auto"`` to choose by extension with fallbacks (see the module docstring), or
            ``"openslide"``, ``"tifffile"`` or ``"pil"`` to force one backend without fallback.

    Returns:
        An open :class:`SlideReader`; close it or use it as a context manager.

    Raises:
        SlideNotFoundError: ``path`` does not exist.
        UnsupportedFormatError: the extension is not supported, or ``path`` is a directory.
        SlideReadError: the extension is supported but no backend can open and decode the file.
        ValueError: ``backend`` is unknown or ``mpp`` is not a positive number.
    """
    path = Path(path)
    if backend != "auto" and backend not in _READERS:
        raise ValueError(f"backend must be one of {['auto', *_READERS]}, got {backend!r}")
    if not path.exists():
        raise SlideNotFoundError(f"slide file not found: {path}")
    if path.is_dir():
        raise UnsupportedFormatError(
            f"{path} is a directory; open a slide file (for a DICOM series, one of its .dcm files, preferably level 0)"
        )
    if backend != "auto":
        return _READERS[backend](path, mpp=mpp)

    extension = slide_extension(path)
    candidates = _BACKENDS_BY_EXTENSION.get(extension)
    if candidates is None:
        raise UnsupportedFormatError(
            f"{path.name} has unsupported extension {extension or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )

    failures: list[str] = []
    for position, name in enumerate(candidates):
        try:
            reader = _READERS[name](path, mpp=mpp)
        except SlideError as exc:
            failures.append(f"{name}: {exc}")
            _log_fallback(path, name, candidates[position + 1 :], exc)
            continue
        try:
            _probe(reader)
        except SlideError as exc:
            reader.close()
            failures.append(f"{name}: opened but failed to decode: {exc}")
            _log_fallback(path, name, candidates[position + 1 :], exc)
            continue
        logger.debug("opened %s with the %s backend", path.name, name)
        return reader
    raise SlideReadError(
        f"no backend can read {path}; the file may be corrupt or truncated, or a variant of "
        f"{extension} these backends do not support. " + " | ".join(failures)
    )


def _log_fallback(path: Path, backend: str, remaining: tuple[str, ...], exc: Exception) -> None:
    if remaining:
        logger.warning("%s: %s backend failed (%s); falling back to %s", path.name, backend, exc, remaining[0])


__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageReader",
    "OpenSlideReader",
    "SlideReader",
    "TiffReader",
    "is_supported",
    "open_slide",
    "slide_extension",
]
