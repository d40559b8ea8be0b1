"""Tissue detection on a low-resolution image of the slide, and GeoJSON export of the result.

The default method thresholds HSV saturation with Otsu's method on an image of about 8 um/px:
stained tissue is saturated, glass and empty canvas are not. Area limits are fractions of the
scanned area, so the same defaults work for a biopsy crop and for a full resection slide.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from virchow.errors import ConfigError
from virchow.wsi.readers.base import SlideReader

logger = logging.getLogger(__name__)

TissueMethod = Literal["otsu", "none", "mask"]

#: Pixel size of the image tissue detection runs on, in um/px.
DEFAULT_THUMBNAIL_MPP = 8.0
#: Length of the longest side of the detection image for slides without a pixel size, in pixels.
FALLBACK_THUMBNAIL_SIDE = 2048


@dataclass(frozen=True)
class OtsuParams:
    """Parameters of the saturation + Otsu detector.

    Kernel sizes are in detection-image pixels (8 um each at the default resolution); area limits
    are fractions of the scanned area.

    Attributes:
        median_kernel: side of the median filter applied to the saturation channel (odd).
        min_saturation: lowest threshold on 0-255 saturation; Otsu's value is raised to it so that
            a blank slide, whose saturation is only noise, gives no tissue.
        dark_value: pixels with HSV value below this (0-255) get saturation 0, because saturation is
            unstable for near-black pixels (pen ink, dark canvas, fluorescence background).
        close_kernel: side of the elliptical closing kernel that joins nearby tissue.
        open_kernel: side of the elliptical opening kernel that removes specks.
        min_component_fraction: tissue components smaller than this fraction of the area are removed.
        max_hole_fraction: holes smaller than this fraction of the area are filled.
    """

    median_kernel: int = 7
    min_saturation: int = 20
    dark_value: int = 25
    close_kernel: int = 5
    open_kernel: int = 3
    min_component_fraction: float = 5e-4
    max_hole_fraction: float = 5e-4


@dataclass(frozen=True)
class TissuePolygon:
    """One tissue region as level-0 (x, y) vertex arrays: the outer ring and any holes."""

    exterior: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)


@dataclass
class TissueMask:
    """Boolean tissue mask over the scanned area of a slide.

    Attributes:
        mask: (height, width) bool array; True is tissue.
        downsample: level-0 pixels per mask pixel. Mask pixel (row i, column j) covers level-0
            x in ``[origin[0] + j * downsample, origin[0] + (j + 1) * downsample)`` and likewise y.
        origin: level-0 (x, y) of the top-left corner of mask pixel (0, 0), the bounds origin.
        bounds: level-0 (x, y, width, height) of the scanned area; nothing outside it is tissue.
        mpp: size of a mask pixel in um, or None when the slide has no pixel size.
        method: ``"otsu"``, ``"none"`` or ``"mask"``.
        params: method parameters as JSON-serialisable values.
        contours: tissue regions as level-0 polygons.
    """

    mask: np.ndarray
    downsample: float
    origin: tuple[int, int]
    bounds: tuple[int, int, int, int]
    mpp: float | None
    method: str
    params: dict[str, Any]
    contours: list[TissuePolygon]

    @property
    def is_empty(self) -> bool:
        """True when no pixel is tissue."""
        return not bool(self.mask.any())

    @property
    def tissue_fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def attrs(self) -> dict[str, Any]:
        """Return the mask geometry, method and parameters as JSON-serialisable values for HDF5 attributes.

        ``mask_mpp`` is present only when the slide has a pixel size.
        """
        attrs = {
            "method": self.method,
            "params_json": json.dumps(self.params, sort_keys=True),
            "downsample": float(self.downsample),
            "origin": [int(value) for value in self.origin],
            "bounds": [int(value) for value in self.bounds],
            "shape": [int(value) for value in self.mask.shape],
            "tissue_fraction": self.tissue_fraction,
        }
        if self.mpp is not None:  # HDF5 attributes cannot hold None, so the key is left out
            attrs["mask_mpp"] = float(self.mpp)
        return attrs

    def tile_fractions(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Return the tissue fraction of square tiles.

        The mask is treated as piecewise constant, so partial mask pixels count by area (bilinear
        lookup in the integral image is exact for such a mask). Area outside :attr:`bounds`
        counts as background.

        Args:
            coords: (N, 2) level-0 top-left (x, y) of the tiles.
            size_level0: tile side in level-0 pixels.

        Returns:
            (N,) float64 fractions in [0, 1].
        """
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if len(coords) == 0:
            return np.zeros(0, dtype=np.float64)
        integral = cv2.integral(self.mask.astype(np.uint8)).astype(np.float64)
        bx, by, bw, bh = self.bounds
        x0 = np.clip(coords[:, 0], bx, bx + bw)
        y0 = np.clip(coords[:, 1], by, by + bh)
        x1 = np.clip(coords[:, 0] + size_level0, bx, bx + bw)
        y1 = np.clip(coords[:, 1] + size_level0, by, by + bh)
        u0, u1 = (x0 - self.origin[0]) / self.downsample, (x1 - self.origin[0]) / self.downsample
        v0, v1 = (y0 - self.origin[1]) / self.downsample, (y1 - self.origin[1]) / self.downsample
        area = (
            _integral_at(integral, u1, v1)
            - _integral_at(integral, u0, v1)
            - _integral_at(integral, u1, v0)
            + _integral_at(integral, u0, v0)
        )
        tile_area = (size_level0 / self.downsample) ** 2
        return np.clip(area / tile_area, 0.0, 1.0)


def _integral_at(integral: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinearly interpolate an (H + 1, W + 1) integral image at fractional mask coordinates (u, v)."""
    rows, columns = integral.shape
    u = np.clip(u, 0, columns - 1)
    v = np.clip(v, 0, rows - 1)
    u0 = np.minimum(np.floor(u).astype(np.int64), columns - 2) if columns > 1 else np.zeros_like(u, dtype=np.int64)
    v0 = np.minimum(np.floor(v).astype(np.int64), rows - 2) if rows > 1 else np.zeros_like(v, dtype=np.int64)
    du, dv = u - u0, v - v0
    u1, v1 = np.minimum(u0 + 1, columns - 1), np.minimum(v0 + 1, rows - 1)
    top = integral[v0, u0] * (1 - du) + integral[v0, u1] * du
    bottom = integral[v1, u0] * (1 - du) + integral[v1, u1] * du
    return top * (1 - dv) + bottom * dv


def detection_downsample(reader: SlideReader, thumbnail_mpp: float = DEFAULT_THUMBNAIL_MPP) -> float:
    """Return the level-0 downsample of the detection image (at least 1).

    Without a slide pixel size the image is sized so its longest side is
    :data:`FALLBACK_THUMBNAIL_SIDE` pixels, and a WARNING is logged.
    """
    _, _, width, height = reader.bounds
    if reader.mpp is None:
        logger.warning(
            "%s has no pixel size; tissue detection runs at %d px on the longest side instead of %.3g um/px",
            reader.path.name,
            FALLBACK_THUMBNAIL_SIDE,
            thumbnail_mpp,
        )
        return max(1.0, max(width, height) / FALLBACK_THUMBNAIL_SIDE)
    return max(1.0, thumbnail_mpp / reader.mpp)


def detect_tissue(
    reader: SlideReader,
    method: TissueMethod = "otsu",
    *,
    mask_path: str | Path | None = None,
    mask_classification: str | None = None,
    thumbnail_mpp: float = DEFAULT_THUMBNAIL_MPP,
    params: OtsuParams | None = None,
) -> TissueMask:
    """Find tissue inside the scanned area of a slide.

    Args:
        reader: open slide.
        method: ``"otsu"`` for saturation thresholding, ``"none"`` for the whole scanned area, or
            ``"mask"`` for a user mask given by ``mask_path``.
        mask_path: for ``method="mask"``: a GeoJSON file of polygons in level-0 pixel coordinates
            (QuPath export) or a PNG mask of any size covering the whole level 0 (non-zero, or
            non-transparent, pixels are tissue).
        mask_classification: for GeoJSON masks, keep only features whose classification name is
            this (for example ``"Tissue"``); all polygons when None.
        thumbnail_mpp: pixel size of the detection image in um/px.
        params: Otsu parameters; the defaults of :class:`OtsuParams` when None.

    Returns:
        The :class:`TissueMask`. A slide without tissue gives an empty mask, not an error. For
        ``"otsu"``, parts of the slide that fail to decode count as background and their level-0
        (x, y, width, height) rectangles are listed in ``params["damaged_regions"]``.

    Raises:
        ConfigError: the method is unknown, or the user mask is missing or invalid.
    """
    bx, by, bw, bh = reader.bounds
    downsample = detection_downsample(reader, thumbnail_mpp)
    mask_mpp = reader.mpp * downsample if reader.mpp is not None else None
    shape = (max(1, int(np.ceil(bh / downsample))), max(1, int(np.ceil(bw / downsample))))
    recorded: dict[str, Any] = {"thumbnail_mpp": thumbnail_mpp}

    if method == "otsu":
        params = params or OtsuParams()
        damaged: list[tuple[int, int, int, int]] = []
        image = reader.read_downsampled(downsample, (bx, by, bw, bh), damaged_regions=damaged)
        mask, threshold = otsu_tissue_mask(image, params)
        recorded.update(vars(params), otsu_threshold=threshold, damaged_regions=damaged)
    elif method == "none":
        mask = np.ones(shape, dtype=bool)
    elif method == "mask":
        if mask_path is None:
            raise ConfigError('method="mask" needs mask_path: a GeoJSON or PNG file')
        mask_path = Path(mask_path)
        recorded["mask_path"] = mask_path.name
        if not mask_path.is_file():
            raise ConfigError(f"tissue mask file not found: {mask_path}")
        if mask_path.suffix.lower() in {".geojson", ".json"}:
            polygons = load_geojson_polygons(mask_path, classification=mask_classification)
            recorded["mask_classification"] = mask_classification
            mask = rasterize_polygons(polygons, shape, (bx, by), downsample)
        elif mask_path.suffix.lower() == ".png":
            mask = rasterize_png_mask(mask_path, reader.dimensions, shape, (bx, by), downsample)
        else:
            raise ConfigError(f"tissue mask {mask_path.name} must be .geojson, .json or .png")
    else:
        raise ConfigError(f"tissue method must be 'otsu', 'none' or 'mask', got {method!r}")

    contours = polygons_from_mask(mask, (bx, by), downsample)
    result = TissueMask(
        mask=mask,
        downsample=float(downsample),
        origin=(bx, by),
        bounds=(bx, by, bw, bh),
        mpp=mask_mpp,
        method=method,
        params=_json_safe(recorded),
        contours=contours,
    )
    logger.info(
        "%s: tissue method %s found %.1f%% tissue in %d regions",
        reader.path.name,
        method,
        100 * result.tissue_fraction,
        len(contours),
    )
    return result


def otsu_tissue_mask(image: np.ndarray, params: OtsuParams) -> tuple[np.ndarray, float]:
    """Threshold the HSV saturation of an RGB image.

    Args:
        image: (height, width, 3) uint8 RGB.
        params: detector parameters.

    Returns:
        (mask, threshold): the (height, width) bool tissue mask and the saturation threshold used.
    """
    height, width = image.shape[:2]
    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    saturation = hsv[..., 1].copy()
    saturation[hsv[..., 2] < params.dark_value] = 0
    kernel = params.median_kernel if params.median_kernel % 2 == 1 else params.median_kernel + 1
    saturation = cv2.medianBlur(saturation, kernel) if min(height, width) >= kernel else saturation

    otsu, _ = cv2.threshold(saturation.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = float(max(otsu, params.min_saturation))
    mask = (saturation > threshold).astype(np.uint8)

    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _ellipse(params.close_kernel))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _ellipse(params.open_kernel))
    area = height * width
    mask = _remove_small_components(mask, params.min_component_fraction * area)
    mask = _fill_small_holes(mask, params.max_hole_fraction * area)
    return mask.astype(bool), threshold


def write_geojson(mask: TissueMask, path: str | Path, *, offset: tuple[float, float] = (0.0, 0.0)) -> Path:
    """Write the tissue contours as a GeoJSON FeatureCollection of Polygons that QuPath imports.

    Coordinates are level-0 pixels. Viewers that show only the scanned bounds of a slide (for
    example MRXS cropped to ``openslide.bounds-*``) use coordinates shifted by the bounds origin.
    For them, pass ``offset=reader.bounds[:2]``, which is subtracted from every vertex.

    Args:
        mask: detection result.
        path: output ``.geojson`` file.
        offset: level-0 (x, y) subtracted from every vertex.

    Returns:
        ``path`` as a Path.
    """
    shift = np.asarray(offset, dtype=np.float64)
    features = []
    for polygon in mask.contours:
        rings = [polygon.exterior, *polygon.holes]
        coordinates = [_closed_ring(ring - shift) for ring in rings]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coordinates},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    "isLocked": False,
                },
            }
        )
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _closed_ring(ring: np.ndarray) -> list[list[float]]:
    points = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
    if points and points[0] != points[-1]:
        points.append(points[0])
    return points


def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (max(1, size), max(1, size)))


def _remove_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, dtype=np.uint8)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_area: float) -> np.ndarray:
    background = (mask == 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = np.zeros(count, dtype=bool)
    fill[1:] = stats[1:, cv2.CC_STAT_AREA] < max_area
    fill[border] = False
    filled = mask.copy()
    filled[fill[labels]] = 1
    return filled


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


# ---------------------------------------------------------------------- user masks and polygons


def load_geojson_polygons(path: str | Path, *, classification: str | None = None) -> list[TissuePolygon]:
    """Read Polygon and MultiPolygon geometries in level-0 pixel coordinates from a GeoJSON file.

    Accepts a FeatureCollection, a single Feature, a bare geometry, or a JSON list of Features
    (older QuPath exports). Other geometry types are skipped with a WARNING.

    Raises:
        ConfigError: the file is not valid JSON or contains no polygon.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tissue mask {path} is not valid GeoJSON: {exc}") from exc
    if isinstance(document, dict) and document.get("type") == "FeatureCollection":
        features = document.get("features", [])
    elif isinstance(document, list):
        features = document
    elif isinstance(document, dict) and document.get("type") == "Feature":
        features = [document]
    else:
        features = [{"type": "Feature", "geometry": document, "properties": {}}]

    polygons: list[TissuePolygon] = []
    for feature in features:
        properties = feature.get("properties") or {}
        name = (properties.get("classification") or {}).get("name")
        if classification is not None and name != classification:
            continue
        geometry = feature.get("geometry") or {}
        kind = geometry.get("type")
        if kind == "Polygon":
            parts = [geometry["coordinates"]]
        elif kind == "MultiPolygon":
            parts = geometry["coordinates"]
        else:
            logger.warning("%s: skipping a %s geometry; only Polygon and MultiPolygon are used", path.name, kind)
            continue
        for rings in parts:
            arrays = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in rings if len(ring) >= 3]
            if arrays:
                polygons.append(TissuePolygon(exterior=arrays[0], holes=arrays[1:]))
    if not polygons:
        filter_text = f" with classification {classification!r}" if classification else ""
        raise ConfigError(f"tissue mask {path} contains no Polygon or MultiPolygon{filter_text}")
    return polygons


def rasterize_polygons(
    polygons: list[TissuePolygon], shape: tuple[int, int], origin: tuple[int, int], downsample: float
) -> np.ndarray:
    """Draw level-0 polygons (holes cleared) into a (height, width) bool mask of the given geometry."""
    mask = np.zeros(shape, dtype=np.uint8)
    fixed_point = 16  # cv2.fillPoly with shift=4 takes coordinates in 1/16 pixel

    def to_mask(ring: np.ndarray) -> np.ndarray:
        # A mask pixel's centre is at (index + 0.5) in level-0 / downsample units.
        points = (ring - np.asarray(origin, dtype=np.float64)) / downsample - 0.5
        return np.round(points * fixed_point).astype(np.int32).reshape(-1, 1, 2)

    for polygon in polygons:
        cv2.fillPoly(mask, [to_mask(polygon.exterior)], 1, lineType=cv2.LINE_8, shift=4)
        if polygon.holes:
            cv2.fillPoly(mask, [to_mask(hole) for hole in polygon.holes], 0, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def rasterize_png_mask(
    path: Path, slide_size: tuple[int, int], shape: tuple[int, int], origin: tuple[int, int], downsample: float
) -> np.ndarray:
    """Sample a PNG mask that covers the whole level 0 (at any scale) onto the detection grid.

    Non-zero pixels are tissue; for images with an alpha channel, non-transparent pixels are.

    Raises:
        ConfigError: the PNG aspect ratio differs from the slide's by more than 2%.
    """
    with Image.open(path) as image:
        has_alpha = image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info
        array = np.asarray(image.convert("RGBA"))[..., 3] if has_alpha else np.asarray(image.convert("L"))
    png_h, png_w = array.shape
    slide_w, slide_h = slide_size
    if abs((png_w / png_h) / (slide_w / slide_h) - 1) > 0.02:
        raise ConfigError(
            f"tissue mask {path.name} is {png_w}x{png_h} but the slide is {slide_w}x{slide_h}; a PNG mask must "
            "cover the whole level 0 with the same aspect ratio"
        )
    centres_x = origin[0] + (np.arange(shape[1]) + 0.5) * downsample
    centres_y = origin[1] + (np.arange(shape[0]) + 0.5) * downsample
    columns = np.clip((centres_x * png_w / slide_w).astype(np.int64), 0, png_w - 1)
    rows = np.clip((centres_y * png_h / slide_h).astype(np.int64), 0, png_h - 1)
    return array[rows[:, None], columns[None, :]] > 0


def polygons_from_mask(mask: np.ndarray, origin: tuple[int, int], downsample: float) -> list[TissuePolygon]:
    """Trace the outer boundaries and holes of a mask and return them as level-0 polygons."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    offset = np.asarray(origin, dtype=np.float64)

    def to_level0(contour: np.ndarray) -> np.ndarray:
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3:  # a one- or two-pixel-wide region: use its pixel-edge rectangle
            x, y, width, height = cv2.boundingRect(contour)
            corners = np.array([[x, y], [x + width, y], [x + width, y + height], [x, y + height]], dtype=np.float64)
            return offset + corners * downsample
        return offset + (points + 0.5) * downsample

    polygons = []
    for index, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue
        holes = []
        child = first_child
        while child != -1:
            holes.append(to_level0(contours[child]))
            child = hierarchy[0][child][0]
        polygons.append(TissuePolygon(exterior=to_level0(contours[index]), holes=holes))
    return polygons
