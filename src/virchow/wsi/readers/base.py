"""Backend-independent whole-slide reader interface.

Conventions used by every reader and every function of :mod:`virchow.wsi`:

* A *location* is an (x, y) pair in level-0 pixels, x to the right and y down, with (0, 0) at the
  top-left pixel of level 0.
* A *size* is a (width, height) pair in pixels of the level it refers to.
* Arrays are (height, width, 3) ``uint8`` RGB. Transparent pixels are composited onto white, and
  pixels outside the image are white.
* A read at level L starts at level-L pixel ``round(x / downsample_L)``, so reads at one level
  always fall on that level's pixel grid (see :meth:`SlideReader.level_location`).
"""

from __future__ import annotations

import abc
import logging
import math
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from virchow.errors import TileReadError

logger = logging.getLogger(__name__)

#: Plausible level-0 pixel sizes for a microscope scan, in um/px. Values outside this range are
#: usually software defaults (72 or 96 dpi give 353 or 265 um/px) and are treated as missing.
PLAUSIBLE_MPP_RANGE = (0.05, 20.0)

#: Largest region, in pixels, that one :meth:`SlideReader.read_region` call may return
#: (2**28 px is 768 MiB of RGB).
MAX_REGION_PIXELS = 2**28


def is_plausible_mpp(value: float | None) -> bool:
    """Return True when ``value`` is a finite pixel size inside :data:`PLAUSIBLE_MPP_RANGE`."""
    if value is None or not math.isfinite(value):
        return False
    return PLAUSIBLE_MPP_RANGE[0] <= value <= PLAUSIBLE_MPP_RANGE[1]


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a (height, width, 4) uint8 RGBA array (not premultiplied) onto white.

    Returns:
        A (height, width, 3) uint8 RGB array. Opaque pixels keep their exact values and fully
        transparent pixels become (255, 255, 255).
    """
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


class SlideReader(abc.ABC):
    """Read-only access to a whole-slide image through one backend.

    Subclasses fill the protected attributes in ``__init__`` and implement
    :meth:`_read_level_region` and :meth:`_close`. Readers are context managers.

    Args:
        path: slide file.
        mpp: pixel size override in um/px at level 0. It replaces any metadata value and sets
            :attr:`mpp_source` to ``"override"``.
    """

    #: Backend name recorded in outputs, for example ``"openslide"``.
    backend: str = "abstract"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self._path = Path(path)
        self._mpp_override = mpp
        self._level_dimensions: list[tuple[int, int]] = []
        self._level_downsamples: list[float] = []
        self._properties: dict[str, str] = {}
        self._vendor: str | None = None
        self._mpp_x: float | None = None
        self._mpp_y: float | None = None
        self._mpp_source: str | None = None
        self._pixel_corrections: list[str] = []
        self._closed = False
        if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
            raise ValueError(f"mpp override for {self._path.name} must be a positive number of um/px, got {mpp!r}")

    # ------------------------------------------------------------------ metadata

    @property
    def path(self) -> Path:
        """Path of the slide file."""
        return self._path

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size as (width, height) in pixels."""
        return self._level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every level, level 0 first."""
        return list(self._level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per level pixel for every level (1.0 for level 0)."""
        return list(self._level_downsamples)

    @property
    def mpp_x(self) -> float | None:
        """Level-0 pixel width in um, or None when unknown."""
        return self._mpp_x

    @property
    def mpp_y(self) -> float | None:
        """Level-0 pixel height in um, or None when unknown."""
        return self._mpp_y

    @property
    def mpp(self) -> float | None:
        """Mean of :attr:`mpp_x` and :attr:`mpp_y` in um/px, or None when either is unknown."""
        if self._mpp_x is None or self._mpp_y is None:
            return None
        return (self._mpp_x + self._mpp_y) / 2.0

    @property
    def mpp_source(self) -> str | None:
        """Metadata key the pixel size came from, ``"override"``, or None when unknown."""
        return self._mpp_source

    @property
    def properties(self) -> dict[str, str]:
        """Slide metadata as flat string key-value pairs (a copy)."""
        return dict(self._properties)

    @property
    def vendor(self) -> str | None:
        """Scanner vendor or file flavour, for example ``"aperio"``, or None when unknown."""
        return self._vendor

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Scanned area as level-0 (x, y, width, height); the whole level 0 unless a backend overrides it."""
        width, height = self.dimensions
        return (0, 0, width, height)

    @property
    def pixel_corrections(self) -> tuple[str, ...]:
        """Names of corrections this reader applies to decoded pixels, for example ``dicom_ycbcr_to_rgb``."""
        return tuple(self._pixel_corrections)

    def level_reads_exact(self, level: int) -> bool:
        """Return True when reads at ``level`` return the stored level pixels without resampling.

        Backends that resample at some levels override this; tile reads then avoid those levels.
        """
        self._check_level(level)
        return True

    def level_mpp(self, level: int) -> float | None:
        """Mean pixel size of ``level`` in um/px, or None when the level-0 pixel size is unknown."""
        self._check_level(level)
        if self.mpp is None:
            return None
        return self.mpp * self._level_downsamples[level]

    def _set_mpp(self, mpp_x: float | None, mpp_y: float | None, source: str | None) -> None:
        """Store the metadata pixel size, or the override when one was given at open time."""
        if self._mpp_override is not None:
            if mpp_x is not None:
                logger.info(
                    "%s: mpp override %.6g um/px replaces %.6g um/px from %s",
                    self._path.name,
                    self._mpp_override,
                    mpp_x,
                    source,
                )
            self._mpp_x = self._mpp_y = float(self._mpp_override)
            self._mpp_source = "override"
            return
        if mpp_x is not None and mpp_y is None:
            mpp_y = mpp_x
        if not (is_plausible_mpp(mpp_x) and is_plausible_mpp(mpp_y)):
            if mpp_x is not None:
                logger.warning(
                    "%s: ignoring pixel size %.6g x %.6g um/px from %s because it is outside %s um/px; "
                    "supply the real value as an mpp override",
                    self._path.name,
                    mpp_x,
                    mpp_y,
                    source,
                    PLAUSIBLE_MPP_RANGE,
                )
            self._mpp_x = self._mpp_y = self._mpp_source = None
            return
        self._mpp_x, self._mpp_y, self._mpp_source = float(mpp_x), float(mpp_y), source

    # ------------------------------------------------------------------ geometry

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level whose downsample is not larger than ``downsample``.

        A relative slack of 1e-3 absorbs pyramids whose downsamples are not exact powers of two
        (4.0001 counts as 4). Downsamples below 1 give level 0.
        """
        best = 0
        for level, level_downsample in enumerate(self._level_downsamples):
            if level_downsample <= downsample * (1 + 1e-3) and level_downsample > self._level_downsamples[best]:
                best = level
        return best

    def level_location(self, location: tuple[float, float], level: int) -> tuple[int, int]:
        """Convert a level-0 (x, y) location to the level-``level`` pixel where reads start.

        Returns:
            (x, y) in level pixels: ``round(x / downsample)``, ``round(y / downsample)``.
        """
        self._check_level(level)
        downsample = self._level_downsamples[level]
        return (int(round(location[0] / downsample)), int(round(location[1] / downsample)))

    # ------------------------------------------------------------------ pixels

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a rectangle of one pyramid level as RGB.

        Args:
            location: top-left (x, y) in level-0 pixels. The read starts at the level pixel
                given by :meth:`level_location`.
            level: pyramid level to read from.
            size: (width, height) of the region in pixels of ``level``.

        Returns:
            A (height, width, 3) uint8 RGB array. Parts outside the image are white and
            transparent pixels are composited onto white.

        Raises:
            ValueError: the level, location or size is invalid.
            TileReadError: the backend failed to decode the pixels of this region.
        """
        width, height = (int(size[0]), int(size[1]))
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive (width, height), got {size!r}")
        if width * height > MAX_REGION_PIXELS:
            raise ValueError(f"region {width}x{height} exceeds {MAX_REGION_PIXELS} pixels; read it in smaller parts")
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        x_level, y_level = self.level_location(location, level)
        region = self._read_level_region(level, x_level, y_level, width, height)
        if region.shape != (height, width, 3) or region.dtype != np.uint8:
            raise AssertionError(f"{self.backend} backend returned {region.shape} {region.dtype}")
        return region

    def read_downsampled(
        self,
        downsample: float,
        region: tuple[int, int, int, int] | None = None,
        *,
        max_chunk_pixels: int = 2**24,
        damaged_regions: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        """Build a low-resolution image of a level-0 rectangle by chunked region reads.

        Reads from the coarsest level not coarser than ``downsample`` in chunks of at most
        ``max_chunk_pixels`` level pixels and shrinks each chunk with area averaging, so a slide
        without low-resolution levels never needs one huge read.

        Args:
            downsample: level-0 pixels per output pixel (at least 1).
            region: level-0 (x, y, width, height) to render; the whole level 0 when None.
            max_chunk_pixels: largest chunk read at once, in pixels of the source level.
            damaged_regions: when None, a decode failure raises TileReadError. When a list, a
                failing chunk is split until the failing parts are at most 256 source pixels wide.
                Those parts are painted white and their level-0 (x, y, width, height) is appended.

        Returns:
            A (ceil(height / downsample), ceil(width / downsample), 3) uint8 RGB array whose pixel
            (row i, column j) covers level-0 x in ``[x + j * downsample, x + (j + 1) * downsample)``.
        """
        if downsample < 1:
            raise ValueError(f"downsample must be at least 1, got {downsample}")
        region_x, region_y, region_w, region_h = region if region is not None else (0, 0, *self.dimensions)
        out_w = max(1, math.ceil(region_w / downsample))
        out_h = max(1, math.ceil(region_h / downsample))
        level = self.get_best_level_for_downsample(downsample)
        factor = downsample / self._level_downsamples[level]  # source-level pixels per output pixel
        origin_x, origin_y = region_x / self._level_downsamples[level], region_y / self._level_downsamples[level]

        # Blocks span the full output width when that fits the budget, so strip-based files decode
        # each strip once; otherwise they are squares.
        if out_w * factor * factor <= max_chunk_pixels:
            block_w = out_w
        else:
            block_w = max(1, int(math.sqrt(max_chunk_pixels) / factor))
        block_h = max(1, int(max_chunk_pixels / (block_w * factor * factor)))

        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for top in range(0, out_h, block_h):
            bottom = min(out_h, top + block_h)
            for left in range(0, out_w, block_w):
                right = min(out_w, left + block_w)
                src_x0 = int(round(origin_x + left * factor))
                src_y0 = int(round(origin_y + top * factor))
                src_w = max(1, int(round(origin_x + right * factor)) - src_x0)
                src_h = max(1, int(round(origin_y + bottom * factor)) - src_y0)
                chunk = self._read_chunk(level, src_x0, src_y0, src_w, src_h, damaged_regions)
                if chunk.shape[:2] != (bottom - top, right - left):
                    interpolation = cv2.INTER_AREA if factor > 1 else cv2.INTER_LINEAR
                    chunk = cv2.resize(chunk, (right - left, bottom - top), interpolation=interpolation)
                out[top:bottom, left:right] = chunk
        return out

    def _read_chunk(
        self,
        level: int,
        x: int,
        y: int,
        width: int,
        height: int,
        damaged_regions: list[tuple[int, int, int, int]] | None,
    ) -> np.ndarray:
        """Read level pixels [x, x + width) x [y, y + height), isolating damaged parts when asked."""
        downsample = self._level_downsamples[level]
        location = (int(round(x * downsample)), int(round(y * downsample)))
        try:
            return self.read_region(location, level, (width, height))
        except TileReadError:
            if damaged_regions is None:
                raise
        if max(width, height) <= 256:
            rect = (location[0], location[1], int(round(width * downsample)), int(round(height * downsample)))
            logger.warning("%s: level-0 region %s failed to decode and is shown white", self._path.name, rect)
            damaged_regions.append(rect)
            return np.full((height, width, 3), 255, dtype=np.uint8)
        half_w, half_h = max(1, width // 2), max(1, height // 2)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for top, part_h in ((0, half_h), (half_h, height - half_h)):
            for left, part_w in ((0, half_w), (half_w, width - half_w)):
                if part_w > 0 and part_h > 0:
                    out[top : top + part_h, left : left + part_w] = self._read_chunk(
                        level, x + left, y + top, part_w, part_h, damaged_regions
                    )
        return out

    @abc.abstractmethod
    def _read_level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return the (height, width, 3) uint8 RGB pixels of ``level`` starting at level pixel (x, y).

        Implementations pad with white outside the level and raise TileReadError on decode errors.
        """

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Release the file handles. Further reads raise ValueError."""
        if not self._closed:
            self._closed = True
            self._close()

    @abc.abstractmethod
    def _close(self) -> None:
        """Release backend resources."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g}" if self.mpp is not None else "None"
        return (
            f"{type(self).__name__}({str(self._path)!r}, dimensions={self.dimensions if self._level_dimensions else None}, "
            f"levels={self.level_count}, mpp={mpp}, mpp_source={self._mpp_source!r})"
        )

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self._level_dimensions):
            raise ValueError(
                f"level must be in 0..{len(self._level_dimensions) - 1} for {self._path.name}, got {level}"
            )


def level_downsamples_from_dimensions(level_dimensions: list[tuple[int, int]]) -> list[float]:
    """Return per-level downsamples as the mean of the width and height ratios to level 0."""
    base_w, base_h = level_dimensions[0]
    return [(base_w / w + base_h / h) / 2.0 for w, h in level_dimensions]
