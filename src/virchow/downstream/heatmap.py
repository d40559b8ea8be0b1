"""Per-tile score overlays on slide thumbnails, with CSV and QuPath-importable GeoJSON exports.

Tiles are placed by their level-0 top-left coordinates: a tile at (x, y) with side
``patch_size_level0`` covers thumbnail pixels ``[round(x / d), round((x + s) / d))`` horizontally
(and likewise vertically) for the thumbnail downsample d, at least one pixel wide. Where tiles
overlap, the pixel shows the mean of their normalised scores. Pixels outside every tile keep the
thumbnail's colour.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from virchow.downstream.slide_features import read_slide_features
from virchow.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

Normalization = Literal["rank", "minmax", "none"]


@dataclass
class TileScores:
    """Scores of the tiles of one slide.

    Attributes:
        coords: (N, 2) int64 level-0 top-left (x, y).
        scores: (N,) float scores (attention weights, probabilities, ...).
        patch_size_level0: tile side in level-0 pixels.
        name: what the scores are, used as the GeoJSON measurement name.
    """

    coords: np.ndarray
    scores: np.ndarray
    patch_size_level0: float
    name: str = "score"

    def __post_init__(self) -> None:
        if self.scores.shape[0] == 0:
            raise DataError("there are no tiles to draw")
        if self.coords.shape != (self.scores.shape[0], 2):
            raise DataError(f"{self.scores.shape[0]} scores but coords of shape {self.coords.shape}")
        if not self.patch_size_level0 or self.patch_size_level0 <= 0:
            raise DataError(f"tile size must be positive level-0 pixels, got {self.patch_size_level0}")
        if not np.isfinite(self.scores).all():
            raise DataError(f"{int((~np.isfinite(self.scores)).sum())} tile scores are NaN or Inf")


def normalize_scores(scores: np.ndarray, mode: Normalization) -> np.ndarray:
    """Map scores to [0, 1].

    ``rank`` gives each tile its percentile (ties share the mean rank), ``minmax`` rescales
    linearly (constant scores map to 0.5), and ``none`` keeps the values, clipped to [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    if mode == "rank":
        order = pd.Series(scores).rank(method="average").to_numpy()
        return (order - 1) / max(scores.size - 1, 1)
    if mode == "minmax":
        low, high = scores.min(), scores.max()
        return np.full_like(scores, 0.5) if high == low else (scores - low) / (high - low)
    if mode == "none":
        return np.clip(scores, 0.0, 1.0)
    raise ConfigError(f"normalisation must be rank, minmax or none, got {mode!r}")


def tile_boxes(tiles: TileScores, downsample: float, size: tuple[int, int]) -> np.ndarray:
    """Return (N, 4) thumbnail pixel boxes (x0, y0, x1, y1), end-exclusive and clipped to ``size``."""
    start = np.rint(tiles.coords / downsample).astype(np.int64)
    end = np.rint((tiles.coords + tiles.patch_size_level0) / downsample).astype(np.int64)
    end = np.maximum(end, start + 1)
    width, height = size
    boxes = np.concatenate([start, end], axis=1)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    return boxes


def render_heatmap(
    thumbnail: Image.Image,
    downsample: float,
    tiles: TileScores,
    *,
    cmap: str = "turbo",
    alpha: float = 0.5,
    normalization: Normalization = "rank",
) -> Image.Image:
    """Blend coloured tile cells onto a thumbnail, keeping exactly the thumbnail's size.

    Args:
        thumbnail: RGB thumbnail of the whole level 0.
        downsample: level-0 pixels per thumbnail pixel.
        tiles: coordinates and scores.
        cmap: matplotlib colour map name.
        alpha: opacity of the colour over the thumbnail, in [0, 1].
        normalization: how scores map to colours (see :func:`normalize_scores`).

    Raises:
        ConfigError: on an unknown colour map or alpha outside [0, 1].
    """
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise ConfigError(f"unknown colour map {cmap!r}. See matplotlib.colormaps for the names") from exc

    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float64)
    height, width = base.shape[:2]
    values = normalize_scores(tiles.scores, normalization)

    # accumulate the mean normalised score per pixel over the tiles covering it
    total = np.zeros((height, width))
    count = np.zeros((height, width))
    for (x0, y0, x1, y1), value in zip(tile_boxes(tiles, downsample, (width, height)), values, strict=True):
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    if not covered.any():
        _logger.warning(
            "no tile falls inside the %dx%d thumbnail. Check the coordinates and the tile size", width, height
        )

    # blend the colour-mapped means over the covered pixels only
    colours = colormap(total[covered] / count[covered])[:, :3] * 255.0
    out = base.copy()
    out[covered] = (1.0 - alpha) * base[covered] + alpha * colours
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="RGB")


def tiles_geojson(tiles: TileScores) -> dict:
    """Return a GeoJSON FeatureCollection with one level-0 square Polygon per tile.

    Each feature has ``objectType: "tile"`` and the score under ``measurements``, the form QuPath
    (0.4 and later) imports as tile objects with a measurement.
    """
    size = tiles.patch_size_level0
    features = []
    for (x, y), score in zip(tiles.coords.tolist(), tiles.scores.tolist(), strict=True):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[_number(a), _number(b)] for a, b in ring]]},
                "properties": {"objectType": "tile", "isLocked": True, "measurements": {tiles.name: float(score)}},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)


def write_heatmap(
    slide_path: Path,
    tiles: TileScores,
    out_dir: Path,
    *,
    max_size: int = 2048,
    cmap: str = "turbo",
    alpha: float = 0.5,
    normalization: Normalization = "rank",
) -> dict[str, Path]:
    """Render the heatmap of a slide and write ``<stem>_heatmap.png``, ``_tiles.csv`` and ``_tiles.geojson``.

    Returns:
        The written paths by kind (``png``, ``csv``, ``geojson``).
    """
    from virchow.wsi.qc import thumbnail
    from virchow.wsi.readers import open_slide

    with open_slide(slide_path) as reader:
        image, downsample = thumbnail(reader, max_size)
    overlay = render_heatmap(image, downsample, tiles, cmap=cmap, alpha=alpha, normalization=normalization)

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = slide_path.stem
    paths = {
        "png": out_dir / f"{stem}_heatmap.png",
        "csv": out_dir / f"{stem}_tiles.csv",
        "geojson": out_dir / f"{stem}_tiles.geojson",
    }
    overlay.save(paths["png"])
    pd.DataFrame({"x": tiles.coords[:, 0], "y": tiles.coords[:, 1], tiles.name: tiles.scores}).to_csv(
        paths["csv"], index=False
    )
    paths["geojson"].write_text(json.dumps(tiles_geojson(tiles)))
    _logger.info(
        "heatmap of %s: %d tiles on a %dx%d thumbnail (downsample %.2f), scores %.4g..%.4g, written to %s",
        slide_path.name,
        tiles.scores.size,
        image.width,
        image.height,
        downsample,
        tiles.scores.min(),
        tiles.scores.max(),
        out_dir,
    )
    return paths


def load_tile_scores(
    features: Path | None,
    scores: Path | None,
    *,
    score_key: str = "attention",
    patch_size_level0: float | None = None,
) -> TileScores:
    """Combine tile coordinates and scores from a feature file and/or a scores file.

    Args:
        features: per-slide feature HDF5 with ``coords`` (and the tile size in its attributes).
        scores: HDF5 with dataset ``score_key`` (``predict-mil`` attention files also hold
            ``coords`` and ``patch_size_level0``) or CSV with columns ``x``, ``y`` and ``score_key``.
        score_key: dataset or column holding the scores.
        patch_size_level0: tile side override, in level-0 pixels.

    Raises:
        DataError: if coordinates, scores or the tile size cannot be found or do not line up.
    """
    if scores is None:
        raise DataError("no scores file given. Pass --scores or --checkpoint")
    score_coords, values, score_patch = _read_scores(scores, score_key)

    coords, patch = None, None
    if features is not None:
        slide = read_slide_features(features)
        if slide.coords is None:
            raise DataError(f"{features} has no 'coords' dataset, so tiles cannot be placed")
        coords, patch = slide.coords, slide.patch_size_level0
    if coords is None:
        if score_coords is None:
            raise DataError(f"{scores} has no coordinates. Pass the slide's feature file with --features")
        coords = score_coords
    elif score_coords is not None:
        values = _align(coords, score_coords, values, scores)
    elif values.shape[0] != coords.shape[0]:
        raise DataError(f"{scores} has {values.shape[0]} scores but {features} has {coords.shape[0]} tiles")

    patch = patch_size_level0 or patch or score_patch
    if not patch:
        raise DataError("the inputs do not store the tile size. Pass --patch-size-level0 (level-0 pixels)")
    return TileScores(coords.astype(np.int64), values.astype(np.float64), float(patch), score_key)


def _read_scores(path: Path, key: str) -> tuple[np.ndarray | None, np.ndarray, float | None]:
    if path.suffix.lower() == ".csv":
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read scores table {path}: {exc}") from exc
        missing = [c for c in ("x", "y", key) if c not in table.columns]
        if missing:
            raise DataError(f"{path} has no column {missing}. Expected x, y and {key!r}")
        return table[["x", "y"]].to_numpy(np.int64), table[key].to_numpy(np.float64), None

    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if key not in handle:
                raise DataError(
                    f"{path} has no dataset {key!r}. Datasets: {list(handle.keys())} (choose with --score-key)"
                )
            values = np.asarray(handle[key][()], dtype=np.float64).reshape(-1)
            coords = np.asarray(handle["coords"][()], dtype=np.int64) if "coords" in handle else None
            patch = handle.attrs.get("patch_size_level0")
    except OSError as exc:
        raise DataError(f"cannot read scores file {path}: {exc}") from exc
    patch_value = float(patch) if patch not in (None, "", b"") else None
    return coords, values, patch_value


def _align(coords: np.ndarray, score_coords: np.ndarray, values: np.ndarray, path: Path) -> np.ndarray:
    """Reorder scores to the feature file's tile order by matching (x, y)."""
    if score_coords.shape[0] == coords.shape[0] and np.array_equal(score_coords, coords):
        return values
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(score_coords)}
    missing = [(int(x), int(y)) for x, y in coords if (int(x), int(y)) not in index]
    if missing:
        raise DataError(
            f"{path} has no score for {len(missing)} tiles of the feature file, for example at {missing[:3]}"
        )
    return values[[index[(int(x), int(y))] for x, y in coords]]
