"""Quality-control images: a slide thumbnail with the tissue contour and the kept tiles drawn on it."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from virchow.wsi.readers.base import SlideReader
from virchow.wsi.tiling import TileGrid
from virchow.wsi.tissue import TissueMask

logger = logging.getLogger(__name__)

#: Colours (RGB) of the QC overlay.
TISSUE_COLOUR = (0, 170, 0)
HOLE_COLOUR = (230, 140, 0)
TILE_COLOUR = (20, 60, 230)
BOUNDS_COLOUR = (200, 0, 200)


def thumbnail(reader: SlideReader, max_size: int = 2048) -> tuple[Image.Image, float]:
    """Render the whole level 0 with its longest side at most ``max_size`` pixels.

    Built by chunked reads from the best pyramid level (see :meth:`SlideReader.read_downsampled`),
    so slides without low-resolution levels work too.

    Args:
        reader: open slide.
        max_size: maximum length of the thumbnail's longest side, in pixels.

    Returns:
        (image, downsample): an RGB PIL image and the level-0 pixels per thumbnail pixel, so that
        thumbnail pixel (column j, row i) covers level-0 x in ``[j * downsample, (j + 1) * downsample)``.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    width, height = reader.dimensions
    downsample = max(1.0, max(width, height) / max_size)
    # Damaged parts are painted white so that QC still shows the rest of a partly corrupt slide.
    pixels = reader.read_downsampled(downsample, damaged_regions=[])
    return Image.fromarray(pixels), downsample


def draw_qc(
    reader: SlideReader,
    *,
    tissue_mask: TissueMask | None = None,
    tile_grid: TileGrid | None = None,
    max_size: int = 2048,
) -> tuple[Image.Image, float]:
    """Draw the scanned bounds, tissue contours (holes in orange) and kept tiles on a thumbnail.

    Args:
        reader: open slide.
        tissue_mask: detection result whose contours are drawn, or None.
        tile_grid: tiles drawn as rectangles of ``params["patch_size_level0"]`` level-0 pixels, or None.
        max_size: maximum length of the image's longest side, in pixels.

    Returns:
        (image, downsample) as for :func:`thumbnail`.
    """
    image, downsample = thumbnail(reader, max_size)
    canvas = np.array(image)
    line = max(1, round(max(canvas.shape[:2]) / 1000))

    bx, by, bw, bh = reader.bounds
    if (bx, by, bw, bh) != (0, 0, *reader.dimensions):
        cv2.rectangle(canvas, _point((bx, by), downsample), _point((bx + bw, by + bh), downsample), BOUNDS_COLOUR, line)

    if tile_grid is not None and len(tile_grid):
        side = float(tile_grid.params["patch_size_level0"])
        for x, y in tile_grid.coords:
            top_left = _point((x, y), downsample)
            bottom_right = _point((x + side, y + side), downsample)
            cv2.rectangle(canvas, top_left, bottom_right, TILE_COLOUR, 1)

    if tissue_mask is not None:
        for polygon in tissue_mask.contours:
            cv2.polylines(canvas, [_polyline(polygon.exterior, downsample)], True, TISSUE_COLOUR, line + 1)
            for hole in polygon.holes:
                cv2.polylines(canvas, [_polyline(hole, downsample)], True, HOLE_COLOUR, line)
    return Image.fromarray(canvas), downsample


def write_qc_thumbnail(
    reader: SlideReader,
    path: str | Path,
    *,
    tissue_mask: TissueMask | None = None,
    tile_grid: TileGrid | None = None,
    max_size: int = 2048,
) -> Path:
    """Write the image of :func:`draw_qc` as PNG and return its path."""
    image, _ = draw_qc(reader, tissue_mask=tissue_mask, tile_grid=tile_grid, max_size=max_size)
    path = Path(path)
    image.save(path, format="PNG")
    logger.debug("wrote QC thumbnail %s", path)
    return path


def _point(xy: tuple[float, float], downsample: float) -> tuple[int, int]:
    return (int(round(xy[0] / downsample)), int(round(xy[1] / downsample)))


def _polyline(ring: np.ndarray, downsample: float) -> np.ndarray:
    return np.round(ring / downsample).astype(np.int32).reshape(-1, 1, 2)
