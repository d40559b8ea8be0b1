"""Choose the pyramid level and read size that give tiles at a target pixel size.

Virchow expects 224x224 tiles at 0.5 um/px. A tile is read as a square of ``read_size`` pixels at
the chosen level and resized to ``tile_size``. ``read_size`` is an integer, so the effective pixel
size differs from the target by at most half a level pixel per tile side (0.22% for a 224-pixel
read); :class:`ResolutionPlan` records the effective value. Pixel sizes are never rounded to a
nominal magnification.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from virchow.errors import MissingMppError, ResolutionError
from virchow.wsi.readers.base import SlideReader

logger = logging.getLogger(__name__)

#: Virchow's native pixel size, in um/px.
DEFAULT_TARGET_MPP = 0.5
#: Virchow's input tile side, in pixels.
DEFAULT_TILE_SIZE = 224
#: A level up to this fraction coarser than the target still counts as the target level.
DEFAULT_LEVEL_TOLERANCE = 0.01
#: A slide whose level 0 is coarser than the target by more than this fraction is rejected.
DEFAULT_MAX_UPSAMPLE = 0.05


@dataclass(frozen=True)
class ResolutionPlan:
    """Level, read size and pixel sizes used to read the tiles of one slide.

    Attributes:
        target_mpp: requested tile pixel size in um/px.
        tile_size: side of an output tile in pixels.
        level: pyramid level the tiles are read from.
        level_downsample: level-0 pixels per pixel of ``level``.
        level_mpp: pixel size of ``level`` in um/px.
        read_size: side of the square read at ``level`` for one tile, in level pixels.
        scale: output pixels per level pixel (``tile_size / read_size``); exactly 1.0 when no
            resize happens.
        patch_size_level0: level-0 pixels covered by one tile side (``read_size * level_downsample``).
            Float; it is rounded only where an integer pixel count is required (drawing, cropping).
        effective_mpp: pixel size of the output tiles in um/px (``level_mpp / scale``).
        slide_mpp: level-0 pixel size of the slide in um/px.
        mpp_source: where ``slide_mpp`` came from (a metadata key or ``"override"``).
    """

    target_mpp: float
    tile_size: int
    level: int
    level_downsample: float
    level_mpp: float
    read_size: int
    scale: float
    patch_size_level0: float
    effective_mpp: float
    slide_mpp: float
    mpp_source: str

    @property
    def needs_resize(self) -> bool:
        """True when a read of ``read_size`` pixels must be resized to ``tile_size``."""
        return self.read_size != self.tile_size

    @property
    def mpp_error(self) -> float:
        """Relative difference between the effective and the target pixel size."""
        return self.effective_mpp / self.target_mpp - 1.0

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-serialisable values, for HDF5 attributes or manifests."""
        return asdict(self)


def plan_resolution(
    reader: SlideReader,
    target_mpp: float = DEFAULT_TARGET_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    *,
    level_tolerance: float = DEFAULT_LEVEL_TOLERANCE,
    max_upsample: float = DEFAULT_MAX_UPSAMPLE,
) -> ResolutionPlan:
    """Choose the coarsest level that is not coarser than ``target_mpp`` and the read size for one tile.

    Only levels the reader returns without resampling are candidates (see
    :meth:`SlideReader.level_reads_exact`); level 0 always is one.

    Args:
        reader: open slide; its :attr:`SlideReader.mpp` (metadata or override) is used.
        target_mpp: output pixel size in um/px.
        tile_size: output tile side in pixels.
        level_tolerance: a level up to this fraction coarser than the target is accepted as the
            target level (0.01: 0.505 um/px serves a 0.5 target, with a 1% upsample).
        max_upsample: when even level 0 is coarser than ``target_mpp * (1 + level_tolerance)``,
            level 0 is upsampled if it is at most this fraction coarser (a WARNING is logged).

    Returns:
        The :class:`ResolutionPlan`.

    Raises:
        MissingMppError: the slide has no pixel size and no override was given.
        ResolutionError: level 0 is more than ``max_upsample`` coarser than the target, or the
            pixels are not square within ``max_upsample``.
        ValueError: ``target_mpp``, ``tile_size`` or a tolerance is out of range.
    """
    if target_mpp <= 0 or tile_size <= 0:
        raise ValueError(f"target_mpp and tile_size must be positive, got {target_mpp} and {tile_size}")
    if not 0 <= level_tolerance <= max_upsample:
        raise ValueError(f"need 0 <= level_tolerance <= max_upsample, got {level_tolerance} and {max_upsample}")
    name = reader.path.name
    if reader.mpp is None or reader.mpp_x is None or reader.mpp_y is None:
        raise MissingMppError(
            f"{name} has no pixel size (mpp) in its metadata. Add an mpp column with this slide's "
            "level-0 um/px to the CSV manifest, or pass --assume-mpp VALUE to use one value for "
            "slides without metadata"
        )
    _check_square_pixels(name, reader.mpp_x, reader.mpp_y, level_tolerance, max_upsample)

    slide_mpp = reader.mpp
    level_mpps = [slide_mpp * downsample for downsample in reader.level_downsamples]
    limit = target_mpp * (1 + level_tolerance)
    candidates = [level for level, mpp in enumerate(level_mpps) if mpp <= limit and reader.level_reads_exact(level)]
    skipped = [level for level, mpp in enumerate(level_mpps) if mpp <= limit and level not in candidates]
    if skipped:
        logger.info(
            "%s: levels %s are not used for tiles because the %s backend resamples reads at their downsamples %s",
            name,
            skipped,
            reader.backend,
            [round(reader.level_downsamples[level], 6) for level in skipped],
        )
    if candidates:
        level = max(candidates, key=lambda index: (level_mpps[index], -index))
    elif slide_mpp <= target_mpp * (1 + max_upsample):
        level = 0
        logger.warning(
            "%s: level 0 is %.4g um/px, %.1f%% coarser than the %.4g um/px target; tiles are upsampled",
            name,
            slide_mpp,
            100 * (slide_mpp / target_mpp - 1),
            target_mpp,
        )
    else:
        raise ResolutionError(
            f"{name}: level 0 is {slide_mpp:.4g} um/px (from {reader.mpp_source}), more than "
            f"{100 * max_upsample:.0f}% coarser than the {target_mpp:.4g} um/px target; tiles cannot be made "
            "without upsampling. Check the slide's mpp, or choose a coarser target"
        )

    level_mpp = level_mpps[level]
    read_size = max(1, round(tile_size * target_mpp / level_mpp))
    scale = tile_size / read_size
    plan = ResolutionPlan(
        target_mpp=float(target_mpp),
        tile_size=int(tile_size),
        level=level,
        level_downsample=float(reader.level_downsamples[level]),
        level_mpp=float(level_mpp),
        read_size=int(read_size),
        scale=float(scale),
        patch_size_level0=float(read_size * reader.level_downsamples[level]),
        effective_mpp=float(level_mpp / scale),
        slide_mpp=float(slide_mpp),
        mpp_source=str(reader.mpp_source),
    )
    logger.info(
        "%s: tiles read at level %d (%.4g um/px) as %d px squares resized to %d px, effective %.5g um/px",
        name,
        level,
        level_mpp,
        read_size,
        tile_size,
        plan.effective_mpp,
    )
    return plan


def _check_square_pixels(name: str, mpp_x: float, mpp_y: float, warn_at: float, fail_at: float) -> None:
    anisotropy = abs(mpp_x / mpp_y - 1)
    if anisotropy > fail_at:
        raise ResolutionError(
            f"{name}: pixels are not square ({mpp_x:.4g} x {mpp_y:.4g} um); square tiles would be distorted "
            f"by {100 * anisotropy:.1f}%"
        )
    if anisotropy > warn_at:
        logger.warning(
            "%s: pixels are %.4g x %.4g um; tiles use the mean and are distorted by %.1f%%",
            name,
            mpp_x,
            mpp_y,
            100 * anisotropy,
        )
