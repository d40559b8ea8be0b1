"""Regions sampled on the fly from whole-slide images, at one pixel size or a mix of them.

Set-up runs once per rank: each slide is opened, its tissue is detected, and for every requested
pixel size a half-overlapping grid of candidate regions with enough tissue is laid out. A sample
then picks a pixel size (by ``data.mpp_weights``), a candidate region uniformly among all slides,
and a random shift of up to a quarter region, and reads it. Only :class:`SlideAccess` touches the
slide-reading layer (:mod:`virchow.wsi`), so a change there changes one class here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from virchow.errors import ConfigError, SlideError, TileReadError
from virchow.pretrain.config import DataConfig

_logger = logging.getLogger(__name__)

#: Draws per sample before a region read failure is raised.
MAX_READ_ATTEMPTS = 10


@dataclass(frozen=True)
class RegionPlan:
    """Candidate regions of one slide at one pixel size.

    Attributes:
        slide: index into the slide list.
        mpp: output pixel size in um/px.
        coords: (N, 2) int64 level-0 top-left (x, y) of regions with enough tissue.
        region_level0: region side in level-0 pixels.
        bounds: level-0 (x, y, width, height) of the scanned area; shifted regions stay inside it.
        resolution: opaque read plan passed back to :meth:`SlideAccess.read`.
    """

    slide: int
    mpp: float
    coords: np.ndarray
    region_level0: float
    bounds: tuple[int, int, int, int]
    resolution: object


class SlideAccess:
    """Adapter over :mod:`virchow.wsi`: open a slide, plan candidate regions, read one region."""

    def __init__(self, path: str | Path) -> None:
        from virchow.wsi.readers import open_slide

        self.path = Path(path)
        self.reader = open_slide(self.path)
        self._tissue = None  # detected on the first call of plan()

    def plan(self, slide_index: int, mpp: float, size: int, min_tissue: float) -> RegionPlan:
        """Lay out regions of ``size`` px at ``mpp`` um/px whose tissue fraction is at least ``min_tissue``.

        Raises:
            SlideError: the slide has no pixel size or is too coarse for ``mpp``.
        """
        from virchow.wsi.resolution import plan_resolution
        from virchow.wsi.tiling import plan_tiles
        from virchow.wsi.tissue import detect_tissue

        if self._tissue is None:
            self._tissue = detect_tissue(self.reader)
        resolution = plan_resolution(self.reader, mpp, size)
        grid = plan_tiles(self.reader, resolution, self._tissue, overlap=size // 2, min_tissue=min_tissue)
        return RegionPlan(
            slide=slide_index,
            mpp=mpp,
            coords=np.asarray(grid.coords, dtype=np.int64),
            region_level0=float(resolution.patch_size_level0),
            bounds=tuple(int(v) for v in self.reader.bounds),  # type: ignore[arg-type]
            resolution=resolution,
        )

    def read(self, plan: RegionPlan, xy: tuple[int, int]) -> np.ndarray:
        """Read the region at level-0 ``xy`` as (size, size, 3) uint8 RGB."""
        from virchow.wsi.tiling import read_tile

        return read_tile(self.reader, plan.resolution, xy)  # type: ignore[arg-type]

    def close(self) -> None:
        """Close the slide."""
        self.reader.close()


def list_slides(entries: list[str]) -> list[Path]:
    """Expand slide files, folders (searched recursively) and ``.txt`` lists into sorted slide paths.

    Raises:
        ConfigError: an entry does not exist, or nothing was found.
    """
    from virchow.wsi.readers import is_supported

    slides: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            slides.extend(sorted(p for p in entry.rglob("*") if p.is_file() and is_supported(p)))
        elif entry.is_file() and entry.suffix.lower() == ".txt":
            lines = [line.strip() for line in entry.read_text().splitlines()]
            slides.extend(Path(line) for line in lines if line and not line.startswith("#"))
        elif entry.is_file():
            slides.append(entry)
        else:
            raise ConfigError(f"data.slides entry {entry} does not exist")
    if not slides:
        raise ConfigError(f"no slide files found in data.slides={entries}")
    return slides


class SlideSource:
    """Random regions of slides, one per sample index, at one or several pixel sizes.

    Args:
        cfg: data settings (slides, mpp values and weights, tissue threshold).
        region_size: side of each returned region in pixels.
    """

    def __init__(self, cfg: DataConfig, region_size: int) -> None:
        self.paths = list_slides(cfg.slides)
        self.region_size = region_size
        weights = list(cfg.mpp_weights) if cfg.mpp_weights is not None else [1.0] * len(cfg.mpp)
        self.plans: list[list[RegionPlan]] = [[] for _ in cfg.mpp]

        for slide_index, path in enumerate(self.paths):
            try:
                access = SlideAccess(path)
            except SlideError as exc:
                _logger.warning("skipping slide %d (%s): %s", slide_index, path.name, exc)
                continue
            try:
                for mpp_index, mpp in enumerate(cfg.mpp):
                    try:
                        plan = access.plan(slide_index, mpp, region_size, cfg.tissue_threshold)
                    except SlideError as exc:
                        _logger.warning("slide %s is not sampled at %.3g um/px: %s", path.name, mpp, exc)
                        continue
                    if len(plan.coords):
                        self.plans[mpp_index].append(plan)
            finally:
                access.close()

        counts = [sum(len(p.coords) for p in plans) for plans in self.plans]
        for mpp, count in zip(cfg.mpp, counts, strict=True):
            _logger.info("%d candidate regions of %d px at %.3g um/px", count, region_size, mpp)
        usable = [w if c > 0 else 0.0 for w, c in zip(weights, counts, strict=True)]
        if sum(usable) <= 0:
            raise ConfigError(
                f"no slide region of {region_size} px at {cfg.mpp} um/px has a tissue fraction of at least "
                f"{cfg.tissue_threshold}: lower data.tissue_threshold or check data.slides"
            )
        for mpp, weight, count in zip(cfg.mpp, weights, counts, strict=True):
            if weight > 0 and count == 0:
                _logger.warning("no candidate regions at %.3g um/px; its share goes to the other pixel sizes", mpp)
        self.mpps = list(cfg.mpp)
        self.mpp_probabilities = np.asarray(usable) / sum(usable)
        self._offsets = [np.cumsum([0] + [len(p.coords) for p in plans]) for plans in self.plans]
        self._open: dict[int, SlideAccess] = {}

    def __len__(self) -> int:
        """Candidate regions over all slides and pixel sizes."""
        return int(sum(offsets[-1] for offsets in self._offsets))

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Return a random (region_size, region_size, 3) uint8 region drawn with ``rng``.

        A region that fails to decode is logged and replaced by another draw, up to
        :data:`MAX_READ_ATTEMPTS` times.

        Raises:
            TileReadError: every attempt failed.
        """
        for attempt in range(MAX_READ_ATTEMPTS):
            try:
                return self._draw(rng)
            except TileReadError as exc:
                if attempt == MAX_READ_ATTEMPTS - 1:
                    raise
                _logger.warning("sample %d: region read failed, drawing another (%s)", index, exc)
        raise AssertionError("unreachable")

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        mpp_index = int(rng.choice(len(self.mpps), p=self.mpp_probabilities))
        offsets = self._offsets[mpp_index]
        flat = int(rng.integers(0, offsets[-1]))
        plan_index = int(np.searchsorted(offsets, flat, side="right") - 1)
        plan = self.plans[mpp_index][plan_index]
        x, y = plan.coords[flat - offsets[plan_index]]
        shift = rng.uniform(-0.25, 0.25, size=2) * plan.region_level0
        bx, by, bw, bh = plan.bounds
        x = int(np.clip(x + shift[0], bx, max(bx, bx + bw - plan.region_level0)))
        y = int(np.clip(y + shift[1], by, max(by, by + bh - plan.region_level0)))
        return self._access(plan.slide).read(plan, (x, y))

    def _access(self, slide_index: int) -> SlideAccess:
        # Readers hold file handles that cannot be pickled, so each DataLoader worker opens its own.
        if slide_index not in self._open:
            self._open[slide_index] = SlideAccess(self.paths[slide_index])
        return self._open[slide_index]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state
