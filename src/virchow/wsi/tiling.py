"""Tile grid over the tissue of a slide, and tile reads at the target pixel size.

The grid is laid out in pixels of the read level (see :class:`~virchow.wsi.resolution.ResolutionPlan`):
tile i starts ``i * stride`` level pixels after the first level pixel inside the scanned bounds.
Coordinates are stored as level-0 top-left (x, y) integers, ``round(level_x * level_downsample)``,
which :meth:`SlideReader.level_location` maps back to the same level pixel. A tile therefore
decodes to the same pixels whether it is read alone (:func:`read_tile`) or cut from a larger region
(:func:`read_tiles_from_region`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from virchow.wsi.readers.base import SlideReader
from virchow.wsi.resolution import ResolutionPlan
from virchow.wsi.tissue import TissueMask

logger = logging.getLogger(__name__)

EdgePolicy = Literal["drop", "pad"]

#: Smallest fraction of a tile's area that must be tissue for the tile to be kept.
DEFAULT_MIN_TISSUE = 0.25


@dataclass
class TileGrid:
    """Tiles kept for one slide, in row-major order (y, then x).

    Attributes:
        coords: (N, 2) int64 level-0 top-left (x, y) of each tile.
        tissue_fraction: (N,) float32 fraction of each tile's area that is tissue.
        padded_fraction: (N,) float32 fraction of each tile's area outside the scanned bounds,
            padded white (always 0 with ``edge="drop"``).
        params: grid parameters as JSON-serialisable values (HDF5 attributes).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    padded_fraction: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


def _axis_starts(start: int, end: int, read_size: int, stride: int, edge: EdgePolicy) -> np.ndarray:
    """Level-pixel starts of tiles along one axis of the half-open range [start, end)."""
    extent = end - start
    if edge == "drop":
        count = (extent - read_size) // stride + 1 if extent >= read_size else 0
    else:
        count = math.ceil(max(extent - read_size, 0) / stride) + 1 if extent > 0 else 0
    return start + stride * np.arange(count, dtype=np.int64)


def plan_tiles(
    reader: SlideReader,
    plan: ResolutionPlan,
    tissue_mask: TissueMask,
    *,
    overlap: int = 0,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    edge: EdgePolicy = "drop",
) -> TileGrid:
    """Lay a tile grid over the scanned bounds and keep the tiles with enough tissue.

    Args:
        reader: open slide.
        plan: resolution plan of the slide.
        tissue_mask: tissue detection result of the slide.
        overlap: overlap of neighbouring tiles in output pixels, in ``[0, plan.tile_size)``.
        min_tissue: keep tiles whose tissue fraction is at least this, in [0, 1]. 0 keeps every tile.
        edge: ``"drop"`` keeps only tiles entirely inside the bounds. ``"pad"`` also keeps partial
            tiles at the right and bottom edges, and their outside part reads as white.

    Returns:
        The :class:`TileGrid`; empty when no tile has enough tissue.

    Raises:
        ValueError: ``overlap``, ``min_tissue`` or ``edge`` is out of range.
    """
    if not 0 <= overlap < plan.tile_size:
        raise ValueError(f"overlap must be in [0, {plan.tile_size}) output pixels, got {overlap}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if edge not in ("drop", "pad"):
        raise ValueError(f"edge must be 'drop' or 'pad', got {edge!r}")

    downsample = plan.level_downsample
    level_w, level_h = reader.level_dimensions[plan.level]
    bx, by, bw, bh = reader.bounds
    # The bounds in level pixels: the first pixel fully inside, and the end clipped to the level.
    start_x, start_y = math.ceil(bx / downsample - 1e-9), math.ceil(by / downsample - 1e-9)
    end_x = min(level_w, math.floor((bx + bw) / downsample + 1e-9))
    end_y = min(level_h, math.floor((by + bh) / downsample + 1e-9))
    stride = max(1, round((plan.tile_size - overlap) / plan.scale))

    xs = _axis_starts(start_x, end_x, plan.read_size, stride, edge)
    ys = _axis_starts(start_y, end_y, plan.read_size, stride, edge)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    level_xy = np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
    coords = np.round(level_xy * downsample).astype(np.int64)

    inside_w = np.clip(end_x - level_xy[:, 0], 0, plan.read_size)
    inside_h = np.clip(end_y - level_xy[:, 1], 0, plan.read_size)
    padded = 1.0 - (inside_w * inside_h) / float(plan.read_size**2)
    tissue = tissue_mask.tile_fractions(coords, plan.patch_size_level0)
    keep = tissue >= min_tissue

    params = {
        "tile_size": plan.tile_size,
        "target_mpp": plan.target_mpp,
        "effective_mpp": plan.effective_mpp,
        "level": plan.level,
        "read_size": plan.read_size,
        "patch_size_level0": plan.patch_size_level0,
        "overlap": int(overlap),
        "stride_level": int(stride),
        "stride_level0": float(stride * downsample),
        "min_tissue": float(min_tissue),
        "edge": edge,
        "bounds": [int(value) for value in (bx, by, bw, bh)],
        "candidates": int(len(coords)),
        "kept": int(keep.sum()),
    }
    logger.info(
        "%s: kept %d of %d tiles (min_tissue %.2f, edge %s)",
        reader.path.name,
        params["kept"],
        params["candidates"],
        min_tissue,
        edge,
    )
    return TileGrid(
        coords=coords[keep],
        tissue_fraction=tissue[keep].astype(np.float32),
        padded_fraction=padded[keep].astype(np.float32),
        params=params,
    )


def _level_locations(coords: np.ndarray, plan: ResolutionPlan) -> np.ndarray:
    """Vectorised :meth:`SlideReader.level_location`: both round half to even (``round`` and ``np.rint``)."""
    return np.rint(np.asarray(coords, dtype=np.float64) / plan.level_downsample).astype(np.int64)


def resize_to_tile(region: np.ndarray, plan: ResolutionPlan) -> np.ndarray:
    """Resize a (read_size, read_size, 3) read to (tile_size, tile_size, 3).

    No resize happens when ``read_size == tile_size`` (scale exactly 1). Shrinking uses
    ``cv2.INTER_AREA``; enlarging (only within the upsample tolerance) uses ``cv2.INTER_LINEAR``.
    """
    if not plan.needs_resize:
        return np.ascontiguousarray(region)
    interpolation = cv2.INTER_AREA if plan.read_size > plan.tile_size else cv2.INTER_LINEAR
    return cv2.resize(region, (plan.tile_size, plan.tile_size), interpolation=interpolation)


def read_tile(reader: SlideReader, plan: ResolutionPlan, xy: tuple[int, int]) -> np.ndarray:
    """Read one tile at the plan's pixel size.

    Args:
        reader: open slide.
        plan: resolution plan of the slide.
        xy: level-0 top-left (x, y) of the tile, as stored in :attr:`TileGrid.coords`.

    Returns:
        (tile_size, tile_size, 3) uint8 RGB.

    Raises:
        TileReadError: the tile failed to decode.
    """
    region = reader.read_region((int(xy[0]), int(xy[1])), plan.level, (plan.read_size, plan.read_size))
    return resize_to_tile(region, plan)


def read_tiles_from_region(
    reader: SlideReader, plan: ResolutionPlan, region_xy: tuple[int, int], tile_xys: np.ndarray
) -> np.ndarray:
    """Read one region that covers several tiles and cut the tiles out of it.

    Gives the same pixels as :func:`read_tile` for each tile. If the region fails with
    TileReadError, read its tiles one by one with :func:`read_tile` to find the damaged ones.

    Args:
        reader: open slide.
        plan: resolution plan of the slide.
        region_xy: level-0 top-left (x, y) of the region; no tile may start left of or above it.
        tile_xys: (N, 2) level-0 top-left (x, y) of the tiles.

    Returns:
        (N, tile_size, tile_size, 3) uint8 RGB, in the order of ``tile_xys``.

    Raises:
        ValueError: a tile starts outside the region.
        TileReadError: the region failed to decode.
    """
    tile_xys = np.asarray(tile_xys, dtype=np.int64).reshape(-1, 2)
    out = np.empty((len(tile_xys), plan.tile_size, plan.tile_size, 3), dtype=np.uint8)
    if len(tile_xys) == 0:
        return out
    region_x, region_y = reader.level_location(region_xy, plan.level)
    level_xy = _level_locations(tile_xys, plan)
    offsets = level_xy - np.array([region_x, region_y])
    if (offsets < 0).any():
        raise ValueError(f"tiles must not start left of or above the region at level-0 {tuple(region_xy)}")
    width = int(offsets[:, 0].max()) + plan.read_size
    height = int(offsets[:, 1].max()) + plan.read_size
    region = reader.read_region((int(region_xy[0]), int(region_xy[1])), plan.level, (width, height))
    for index, (dx, dy) in enumerate(offsets):
        out[index] = resize_to_tile(region[dy : dy + plan.read_size, dx : dx + plan.read_size], plan)
    return out


def group_tiles_into_regions(
    reader: SlideReader, plan: ResolutionPlan, coords: np.ndarray, *, tiles_per_side: int = 8
) -> list[tuple[tuple[int, int], np.ndarray]]:
    """Group tiles into blocks of at most ``tiles_per_side`` x ``tiles_per_side`` grid cells for region reads.

    Args:
        reader: open slide; its level geometry must match ``plan``.
        plan: resolution plan of the slide.
        coords: (N, 2) level-0 top-left (x, y) of the tiles.
        tiles_per_side: block side in tiles; a region read is at most
            ``(tiles_per_side + 1) * read_size`` level pixels wide.

    Returns:
        A list of (region level-0 (x, y), indices into ``coords``) in row-major block order, ready
        for :func:`read_tiles_from_region`.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(coords) == 0:
        return []
    if reader.level_downsamples[plan.level] != plan.level_downsample:
        raise ValueError(f"plan level {plan.level} does not match the level geometry of {reader.path.name}")
    level_xy = _level_locations(coords, plan)
    block = plan.read_size * tiles_per_side
    keys = level_xy // block
    order = np.lexsort((keys[:, 0], keys[:, 1]))
    groups: list[tuple[tuple[int, int], np.ndarray]] = []
    boundaries = np.flatnonzero(np.any(np.diff(keys[order], axis=0) != 0, axis=1)) + 1
    for indices in np.split(order, boundaries):
        corner = level_xy[indices].min(axis=0)
        region_xy = (int(round(corner[0] * plan.level_downsample)), int(round(corner[1] * plan.level_downsample)))
        groups.append((region_xy, indices))
    return groups
