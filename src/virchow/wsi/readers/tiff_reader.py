"""tifffile backend: generic and OME-TIFF, flat (non-pyramidal) TIFF, and SVS/NDPI that OpenSlide cannot decode.

Regions are assembled from the tiles or strips they touch: each segment is read from the file and
decoded with tifffile's per-page decoder, so a read never loads a whole level. Decoded segments go
to a small least-recently-used cache because neighbouring reads share segments (a strip of a flat
TIFF spans the full width).
"""

from __future__ import annotations

import logging
import math
import threading
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tifffile

from virchow.errors import SlideReadError, TileReadError, UnsupportedFormatError
from virchow.wsi.readers.base import SlideReader, composite_on_white, level_downsamples_from_dimensions

logger = logging.getLogger(__name__)

#: Largest single tile or strip this reader decodes, in pixels. Pages stored as one huge segment
#: (for example an untiled JPEG) cannot be read region by region.
MAX_SEGMENT_PIXELS = 2**27

#: Memory budget of the decoded-segment cache, in bytes.
SEGMENT_CACHE_BYTES = 128 * 2**20

_OME_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}
_TIFF_UNIT_TO_UM = {2: 25400.0, 3: 1e4}  # ResolutionUnit: 2 = inch, 3 = centimeter
_SUPPORTED_PHOTOMETRIC = {0, 1, 2, 6}  # MINISWHITE, MINISBLACK, RGB, YCbCr (decoded to RGB by the codec)
_VENDOR_BY_KIND = {"svs": "aperio", "ndpi": "hamamatsu", "ome": "ome", "scn": "leica", "bif": "ventana"}
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, OSError, IndexError, tifffile.TiffFileError)


def _rational(value: object) -> float | None:
    if isinstance(value, tuple) and len(value) == 2 and value[1]:
        return value[0] / value[1]
    if isinstance(value, (int, float)) and value:
        return float(value)
    return None


def _mpp_from_ome(ome_xml: str) -> tuple[float | None, float | None]:
    root = ElementTree.fromstring(ome_xml)
    pixels = next(
        (element for element in root.iter() if element.tag.endswith("}Pixels") or element.tag == "Pixels"), None
    )
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None, None
    values = []
    for axis in ("X", "Y"):
        size = pixels.get(f"PhysicalSize{axis}", pixels.get("PhysicalSizeX"))
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in _OME_UNIT_TO_UM:
            logger.warning("unknown OME PhysicalSize%sUnit %r; pixel size ignored", axis, unit)
            return None, None
        values.append(float(size) * _OME_UNIT_TO_UM[unit])
    return values[0], values[1]


def mpp_from_tiff(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> tuple[float | None, float | None, str | None]:
    """Find the level-0 pixel size of a TIFF file.

    Sources, in order: OME-XML ``PhysicalSizeX/Y`` with their units, the Aperio ``MPP`` field of
    the image description, ImageJ ``unit=micron`` with the resolution tags, then ``XResolution``
    and ``YResolution`` with ``ResolutionUnit`` inch or centimeter.

    Returns:
        (mpp_x, mpp_y, source), or (None, None, None) when the file has no physical pixel size.
    """
    if tif.is_ome and tif.ome_metadata:
        mpp_x, mpp_y = _mpp_from_ome(tif.ome_metadata)
        if mpp_x is not None:
            return mpp_x, mpp_y, "ome.PhysicalSizeX"
    if tif.is_svs:
        mpp = tifffile.tifffile.svs_description_metadata(page.description).get("MPP")
        if mpp:
            return float(mpp), float(mpp), "aperio.MPP"

    tags = page.tags
    resolution_x = _rational(tags["XResolution"].value) if "XResolution" in tags else None
    resolution_y = _rational(tags["YResolution"].value) if "YResolution" in tags else resolution_x
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if not resolution_x or not resolution_y:
        return None, None, None
    if tif.is_imagej and unit == 1 and (tif.imagej_metadata or {}).get("unit") in {"micron", "um", "µm"}:
        return 1.0 / resolution_x, 1.0 / resolution_y, "imagej.unit"
    if unit in _TIFF_UNIT_TO_UM:
        return _TIFF_UNIT_TO_UM[unit] / resolution_x, _TIFF_UNIT_TO_UM[unit] / resolution_y, "tiff.XResolution"
    return None, None, None


def _to_rgb(array: np.ndarray, keyframe: tifffile.TiffPage) -> np.ndarray:
    """Convert a decoded (height, width, samples) segment to uint8 RGB composited on white."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if keyframe.photometric == 0:  # MINISWHITE: 0 is white
        array = 255 - array
    samples = array.shape[-1]
    if samples == 1:
        return np.repeat(array, 3, axis=-1)
    if samples == 4:
        extra = tuple(keyframe.extrasamples or (0,))
        if extra[0] == 1:  # associated (premultiplied) alpha
            rgb = array[..., :3].astype(np.uint16) + (255 - array[..., 3:4].astype(np.uint16))
            return np.clip(rgb, 0, 255).astype(np.uint8)
        if extra[0] == 2:
            return composite_on_white(array)
    return np.ascontiguousarray(array[..., :3])


class TiffReader(SlideReader):
    """Slide reader backed by tifffile.

    Reads the first image series of the file and its pyramid levels (SubIFDs, OME levels, or the
    SVS/NDPI level pages). Only images with axes Y, X and optionally S (samples), 1, 3 or 4
    samples, and 8- or 16-bit integers are supported; 16-bit values are scaled to 8 bits.

    Args:
        path: TIFF file.
        mpp: pixel size override in um/px at level 0.

    Raises:
        UnsupportedFormatError: the file is not a TIFF or contains an image layout this reader cannot show as RGB.
        SlideReadError: the TIFF structure is invalid.
    """

    backend = "tifffile"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        try:
            self._tif = tifffile.TiffFile(str(self._path))
            self._tif.filehandle.set_lock(True)  # segment reads may come from several threads
        except tifffile.TiffFileError as exc:
            raise UnsupportedFormatError(f"{self._path} is not a readable TIFF file: {exc}") from exc
        except (OSError, ValueError, IndexError, KeyError) as exc:
            raise SlideReadError(f"tifffile failed to parse {self._path}: {exc}") from exc
        try:
            self._init_levels()
        except BaseException:
            self._tif.close()
            raise
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()

    def _init_levels(self) -> None:
        if not self._tif.series:
            raise UnsupportedFormatError(f"{self._path} contains no image series")
        series = self._tif.series[0]
        self._pages: list[tifffile.TiffPage] = []
        for level in series.levels:
            extra_axes = [
                axis for axis, size in zip(level.axes, level.shape, strict=True) if axis not in "YXS" and size > 1
            ]
            if extra_axes:
                raise UnsupportedFormatError(
                    f"{self._path} has image axes {level.axes} with shape {level.shape}; only 2D RGB or "
                    "greyscale images are supported"
                )
            page = level.pages[0]
            self._check_page(page)
            self._pages.append(page)
        self._pages.sort(key=lambda page: -page.keyframe.imagewidth)

        self._check_not_truncated()
        self._level_dimensions = [(page.keyframe.imagewidth, page.keyframe.imagelength) for page in self._pages]
        self._level_downsamples = level_downsamples_from_dimensions(self._level_dimensions)
        first = self._pages[0].keyframe
        self._vendor = _VENDOR_BY_KIND.get(series.kind, "generic-tiff")
        self._properties = {"tifffile.series-kind": str(series.kind)}
        for tag in first.tags:
            if isinstance(tag.value, (str, int, float)) and not isinstance(tag.value, bool):
                self._properties[f"tiff.{tag.name}"] = str(tag.value)
        self._set_mpp(*mpp_from_tiff(self._tif, first))
        if self.level_count == 1 and max(self.dimensions) > 20000:
            logger.warning(
                "%s has no pyramid (one %dx%d level); thumbnails are built from level 0 by chunked reads",
                self._path.name,
                *self.dimensions,
            )

    def _check_not_truncated(self) -> None:
        file_size = self._tif.filehandle.size
        for level, page in enumerate(self._pages):
            ends = [
                offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True) if count
            ]
            if ends and max(ends) > file_size:
                raise SlideReadError(
                    f"{self._path} is truncated: image data of level {level} ends at byte {max(ends)} but the "
                    f"file has {file_size} bytes; copy the file again from its source"
                )

    def _check_page(self, page: tifffile.TiffPage) -> None:
        keyframe = page.keyframe
        if keyframe.photometric not in _SUPPORTED_PHOTOMETRIC:
            raise UnsupportedFormatError(
                f"{self._path} uses photometric interpretation {keyframe.photometric!s}; supported are "
                "RGB, YCbCr, MINISBLACK and MINISWHITE"
            )
        if keyframe.dtype not in (np.dtype("uint8"), np.dtype("uint16")) or keyframe.samplesperpixel not in (1, 3, 4):
            raise UnsupportedFormatError(
                f"{self._path} stores {keyframe.samplesperpixel} samples of {keyframe.dtype} per pixel; "
                "supported are 1, 3 or 4 samples of uint8 or uint16"
            )
        if keyframe.tiledepth > 1 or keyframe.imagedepth > 1:
            raise UnsupportedFormatError(f"{self._path} is a volumetric TIFF; only 2D images are supported")

    # ------------------------------------------------------------------ pixels

    def _segment_layout(self, level: int) -> tuple[int, int, int, int]:
        """Return (segment height, segment width, segments per row, segments per sample plane)."""
        keyframe = self._pages[level].keyframe
        width, height = self._level_dimensions[level]
        if keyframe.is_tiled:
            columns = math.ceil(width / keyframe.tilewidth)
            return keyframe.tilelength, keyframe.tilewidth, columns, columns * math.ceil(height / keyframe.tilelength)
        rows_per_strip = min(keyframe.rowsperstrip or height, height)
        return rows_per_strip, width, 1, math.ceil(height / rows_per_strip)

    def _read_level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        level_w, level_h = self._level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, level_w), min(y + height, level_h)
        if x1 <= x0 or y1 <= y0:
            return out
        seg_h, seg_w, per_row, _ = self._segment_layout(level)
        if seg_h * seg_w > MAX_SEGMENT_PIXELS:
            raise SlideReadError(
                f"level {level} of {self._path.name} is stored in {seg_w}x{seg_h} segments, more than "
                f"{MAX_SEGMENT_PIXELS} pixels each, and cannot be read region by region; convert the slide "
                "to a tiled pyramidal TIFF"
            )
        for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
            for column in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                segment = self._segment_rgb(level, row * per_row + column, x, y, width, height)
                top, left = row * seg_h, column * seg_w
                sy0, sx0 = max(y0, top), max(x0, left)
                sy1, sx1 = min(y1, top + segment.shape[0]), min(x1, left + segment.shape[1])
                if sy1 > sy0 and sx1 > sx0:
                    out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = segment[sy0 - top : sy1 - top, sx0 - left : sx1 - left]
        return out

    def _segment_rgb(self, level: int, index: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        key = (level, index)
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        page = self._pages[level]
        keyframe = page.keyframe
        planes = keyframe.samplesperpixel if keyframe.planarconfig == 2 else 1
        _, _, _, per_plane = self._segment_layout(level)
        samples = []
        try:
            for plane in range(planes):
                segment_index = plane * per_plane + index
                offset, count = page.dataoffsets[segment_index], page.databytecounts[segment_index]
                if count == 0:
                    samples = []
                    break  # sparse TIFF: a missing segment is background
                with self._tif.filehandle.lock:
                    self._tif.filehandle.seek(offset)
                    data = self._tif.filehandle.read(count)
                decoded, _, _ = keyframe.decode(
                    data,
                    segment_index,
                    jpegtables=page.jpegtables,
                    jpegheader=keyframe.jpegheader,
                    _fullsize=keyframe.is_tiled,
                )
                samples.append(decoded[0])
        except _DECODE_ERRORS as exc:
            downsample = self._level_downsamples[level]
            raise TileReadError(
                f"tifffile failed to decode segment {index} of level {level} of {self._path.name} while reading "
                f"level-0 (x, y)=({round(x * downsample)}, {round(y * downsample)}), level {level}, "
                f"(width, height)=({width}, {height}): {exc}"
            ) from exc
        if not samples:
            seg_h, seg_w, _, _ = self._segment_layout(level)
            rgb = np.full((seg_h, seg_w, 3), 255, dtype=np.uint8)
        else:
            rgb = _to_rgb(np.concatenate(samples, axis=-1), keyframe)
        with self._cache_lock:
            self._cache[key] = rgb
            self._cache_bytes += rgb.nbytes
            while self._cache_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.nbytes
        return rgb

    def _close(self) -> None:
        self._tif.close()
        with self._cache_lock:
            self._cache.clear()
            self._cache_bytes = 0
