"""Embed one slide: open, plan the resolution, find tissue, tile, read, embed, write atomically."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from virchow import __version__
from virchow.embed.embedder import Embedder
from virchow.errors import ConfigError, MissingMppError
from virchow.io.h5 import atomic_h5, write_attrs
from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput
from virchow.pipeline.manifest import SlideOutcome
from virchow.pipeline.tile_stream import TileStream
from virchow.wsi.qc import write_qc_thumbnail
from virchow.wsi.readers import SlideReader, open_slide
from virchow.wsi.resolution import ResolutionPlan, plan_resolution
from virchow.wsi.tiling import TileGrid, plan_tiles
from virchow.wsi.tissue import TissueMask, detect_tissue, write_geojson

_logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
QC_DIR = "qc"
COORDS_ATTRS = ("patch_size", "patch_size_level0", "level0_width", "level0_height", "level", "mpp_target", "overlap")


def feature_path(out_dir: Path, slide_id: str) -> Path:
    """Return where the feature file of ``slide_id`` is written."""
    return out_dir / FEATURES_DIR / f"{slide_id}.h5"


@dataclass
class SlidePlan:
    """Everything decided about a slide before any tile is embedded."""

    slide: SlideInput
    reader: SlideReader
    mpp_override: float | None
    mpp_note: str
    resolution: ResolutionPlan
    tissue: TissueMask
    grid: TileGrid
    plan_seconds: float


def open_with_mpp(slide: SlideInput, config: SlideJobConfig) -> tuple[SlideReader, float | None, str]:
    """Open a slide, applying the per-slide mpp or ``--assume-mpp`` when the metadata has none.

    Returns:
        The reader, the override passed to it (None when the metadata is used), and a note saying
        where the pixel size came from.
    """
    reader = open_slide(slide.path, mpp=slide.mpp)
    if slide.mpp is not None:
        return reader, slide.mpp, "manifest"
    if reader.mpp is None and config.assume_mpp is not None:
        reader.close()
        _logger.warning("%s: no pixel size in the metadata; assuming %.4g um/px (--assume-mpp)", slide.slide_id, config.assume_mpp)
        return open_slide(slide.path, mpp=config.assume_mpp), config.assume_mpp, "assumed (--assume-mpp)"
    if reader.mpp is None:
        reader.close()
        raise MissingMppError(
            f"{slide.path.name} has no pixel size (mpp) in its metadata. Give it in a CSV manifest (columns "
            "path,mpp) or pass --assume-mpp VALUE (um/px, for example 0.25 for 40x or 0.5 for 20x scanners)."
        )
    return reader, None, f"metadata ({reader.mpp_source})"


def plan_slide(slide: SlideInput, config: SlideJobConfig, out_dir: Path) -> SlidePlan:
    """Open a slide and decide its level, tissue and tiles; writes the QC thumbnail and GeoJSON.

    Raises:
        SlideError: the slide cannot be opened, has no usable pixel size, or is too coarse.
        ConfigError: the tissue mask is missing or invalid.
    """
    started = time.perf_counter()
    reader, override, note = open_with_mpp(slide, config)
    try:
        resolution = plan_resolution(reader, config.target_mpp, config.tile_size)
        if config.tissue == "mask" and slide.mask is None:
            raise ConfigError(f"--tissue mask needs a mask for {slide.slide_id}: add a 'mask' column to the CSV manifest")
        tissue = detect_tissue(reader, config.tissue, mask_path=slide.mask)
        grid = plan_tiles(reader, resolution, tissue, overlap=config.overlap, min_tissue=config.min_tissue, edge=config.edge)
        if config.qc:
            qc_dir = out_dir / QC_DIR
            qc_dir.mkdir(parents=True, exist_ok=True)
            write_qc_thumbnail(reader, qc_dir / f"{slide.slide_id}.png", tissue_mask=tissue, tile_grid=grid)
            write_geojson(tissue, qc_dir / f"{slide.slide_id}.geojson")
    except BaseException:
        reader.close()
        raise
    return SlidePlan(slide, reader, override, note, resolution, tissue, grid, time.perf_counter() - started)


def slide_attrs(plan: SlidePlan, config: SlideJobConfig, embedder_metadata: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """Return the attributes that make a feature file self-describing."""
    reader, resolution = plan.reader, plan.resolution
    width, height = reader.dimensions
    return {
        "slide_id": plan.slide.slide_id,
        "slide_path": str(plan.slide.path),
        "reader_backend": reader.backend,
        "pixel_corrections": list(reader.pixel_corrections),
        **embedder_metadata,
        "mpp_target": config.target_mpp,
        "mpp_slide": resolution.slide_mpp,
        "mpp_source": plan.mpp_note,
        "mpp_effective": resolution.effective_mpp,
        "level": resolution.level,
        "level_downsample": resolution.level_downsample,
        "read_size": resolution.read_size,
        "scale": resolution.scale,
        "tile_size": config.tile_size,
        "patch_size": config.tile_size,
        "patch_size_level0": resolution.patch_size_level0,
        "level0_width": width,
        "level0_height": height,
        "bounds": list(reader.bounds),
        "overlap": config.overlap,
        "min_tissue": config.min_tissue,
        "edge": config.edge,
        "tissue_method": plan.tissue.method,
        "tissue_params": plan.tissue.params,
        "tissue_fraction_slide": plan.tissue.tissue_fraction,
        "settings_hash": fingerprint,
        "virchow_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def embed_planned_slide(
    plan: SlidePlan,
    config: SlideJobConfig,
    embedder: Embedder,
    out_path: Path,
    fingerprint: str,
    *,
    progress: bool = True,
) -> SlideOutcome:
    """Read and embed the tiles of a planned slide and write its feature file atomically."""
    started = time.perf_counter()
    slide, grid = plan.slide, plan.grid
    count = len(grid)
    dtype = np.float16 if config.float16 else np.float32
    stream = TileStream(
        lambda: open_slide(slide.path, mpp=plan.mpp_override),
        plan.reader,
        plan.resolution,
        grid.coords,
        workers=config.read_workers,
        region_tiles=config.region_tiles,
    )
    embedder.prepare(count)
    embed_seconds = 0.0

    with atomic_h5(out_path) as handle:
        staging = handle.create_dataset(
            "features_staging", shape=(count, *embedder.output_shape), dtype=dtype,
            chunks=(max(1, min(256, count)), *embedder.output_shape) if count else None,
        )
        done = np.zeros(count, dtype=bool)
        pending_idx: list[np.ndarray] = []
        pending_tiles: list[np.ndarray] = []

        def flush() -> float:
            indices = np.concatenate(pending_idx)
            tiles = np.concatenate(pending_tiles)
            pending_idx.clear()
            pending_tiles.clear()
            t0 = time.perf_counter()
            features = embedder.embed_tiles(tiles).numpy().astype(dtype, copy=False)
            order = np.argsort(indices)  # h5py writes need increasing indices
            staging[indices[order]] = features[order]
            done[indices] = True
            return time.perf_counter() - t0

        with tqdm(total=count, unit="tile", desc=slide.slide_id, disable=not progress, leave=False) as bar:
            buffered = 0
            for indices, tiles in stream:
                pending_idx.append(indices)
                pending_tiles.append(tiles)
                buffered += len(indices)
                if buffered >= embedder.batch_size:
                    embed_seconds += flush()
                    bar.update(buffered)
                    bar.set_postfix(tiles_per_s=f"{done.sum() / max(time.perf_counter() - started, 1e-9):.2f}")
                    buffered = 0
            if buffered:
                embed_seconds += flush()
                bar.update(buffered)

        kept = np.flatnonzero(done)
        _finalise_datasets(handle, staging, kept, grid, stream.stats.failed)
        seconds = time.perf_counter() - started
        attrs = {
            **slide_attrs(plan, config, embedder.metadata(), fingerprint),
            "n_tiles": len(kept),
            "n_failed_tiles": len(stream.stats.failed),
            "feature_dtype": np.dtype(dtype).name,
            "seconds_plan": round(plan.plan_seconds, 3),
            "seconds_embed": round(embed_seconds, 3),
            "seconds_read_wait": round(stream.stats.wait_seconds, 3),
            "seconds_total": round(seconds + plan.plan_seconds, 3),
        }
        write_attrs(handle, attrs)
        # TRIDENT and CLAM readers look for the tiling attributes on the coords dataset.
        write_attrs(handle["coords"], {key: attrs[key] for key in COORDS_ATTRS})

    failed = len(stream.stats.failed)
    total = seconds + plan.plan_seconds
    outcome = SlideOutcome(
        slide_id=slide.slide_id,
        path=str(slide.path),
        status="done",
        reason="ok" if not failed else "tiles_excluded",
        message=f"{failed} unreadable tiles excluded" if failed else "",
        tiles=len(kept),
        failed_tiles=failed,
        seconds=total,
        tiles_per_s=len(kept) / max(total, 1e-9),
        output=str(out_path),
        settings=fingerprint,
    )
    _logger.info(
        "%s: %d tiles in %.1f s (%.2f tiles/s; plan %.1f s, model %.1f s, waiting for reads %.1f s)%s",
        slide.slide_id, len(kept), total, outcome.tiles_per_s, plan.plan_seconds, embed_seconds,
        stream.stats.wait_seconds, f"; {failed} unreadable tiles excluded" if failed else "",
    )
    return outcome


def _finalise_datasets(handle, staging, kept: np.ndarray, grid: TileGrid, failed: list[int]) -> None:
    """Move the staged rows of readable tiles into ``features`` and write coordinates."""
    if len(kept) == len(staging):
        handle.move("features_staging", "features")
    else:
        features = handle.create_dataset("features", shape=(len(kept), *staging.shape[1:]), dtype=staging.dtype)
        for start in range(0, len(kept), 1024):
            rows = kept[start : start + 1024]
            features[start : start + len(rows)] = staging[rows]
        del handle["features_staging"]
    coords = handle.create_dataset("coords", data=grid.coords[kept].astype(np.int64).reshape(-1, 2))
    handle.create_dataset("tissue_fraction", data=grid.tissue_fraction[kept].astype(np.float32))
    handle.create_dataset("padded_fraction", data=grid.padded_fraction[kept].astype(np.float32))
    failed_sorted = np.sort(np.asarray(failed, dtype=np.int64))
    handle.create_dataset("failed_coords", data=grid.coords[failed_sorted].astype(np.int64).reshape(-1, 2))
    coords.attrs["units"] = "level-0 pixels, top-left (x, y)"
