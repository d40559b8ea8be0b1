"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, Philips TIFF, DICOM and generic tiled TIFF.

Two OpenSlide behaviours are corrected here:

* MRXS (and other sparse formats) return transparent pixels outside the scanned area. Dropping the
  alpha channel would turn them black and invert a saturation or brightness threshold, so they are
  composited onto white.
* Some DICOM files declare ``PhotometricInterpretation = RGB`` while their JPEG frames are YCbCr
  (JFIF). OpenSlide 4.0.1 trusts the header and returns YCbCr values as RGB, so colours are false.
  :func:`detect_dicom_ycbcr_quirk` decodes the first frame of the file with Pillow, which follows
  the JPEG markers, and compares it with OpenSlide's pixels of that frame. The conversion is
  applied only when it makes OpenSlide match Pillow.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import openslide
import pydicom
from PIL import Image
from pydicom.encaps import get_frame

from virchow.errors import SlideReadError, TileReadError, UnsupportedFormatError
from virchow.wsi.readers.base import SlideReader, composite_on_white

logger = logging.getLogger(__name__)

#: JPEG baseline and extended transfer syntaxes, the ones whose frames Pillow can decode.
_DICOM_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}

#: Mean absolute difference (0-255 scale) under which two decodes of a frame count as equal.
_COLOUR_MATCH_TOLERANCE = 4.0

_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}

#: Errors of the DICOM colour check that leave the slide readable: unexpected header layouts,
#: undecodable frames, or a failed OpenSlide read of the frame.
_DICOM_CHECK_ERRORS = (
    pydicom.errors.InvalidDicomError,
    AttributeError,
    KeyError,
    IndexError,
    ValueError,
    OSError,
    openslide.OpenSlideError,
)


def _parse_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def mpp_from_openslide_properties(properties: dict[str, str]) -> tuple[float | None, float | None, str | None]:
    """Find the level-0 pixel size in OpenSlide properties.

    Keys are tried in this order: ``openslide.mpp-x/y``, ``aperio.MPP``, the ``mirax.*``
    ``MICROMETER_PER_PIXEL_X/Y`` keys (level 0 of layer 0 first), then ``tiff.XResolution`` and
    ``tiff.YResolution`` with ``tiff.ResolutionUnit`` in centimeter or inch.

    Returns:
        (mpp_x, mpp_y, source key), or (None, None, None) when no key gives a number.
    """
    mpp_x = _parse_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _parse_float(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mpp_x is not None:
        return mpp_x, mpp_y, openslide.PROPERTY_NAME_MPP_X

    aperio = _parse_float(properties.get("aperio.MPP"))
    if aperio is not None:
        return aperio, aperio, "aperio.MPP"

    mirax_keys = sorted(
        (key for key in properties if key.startswith("mirax.") and key.endswith("MICROMETER_PER_PIXEL_X")),
        key=lambda key: (not key.startswith("mirax.LAYER_0_LEVEL_0_SECTION."), key),
    )
    for key_x in mirax_keys:
        mirax_x = _parse_float(properties.get(key_x))
        mirax_y = _parse_float(properties.get(key_x[:-1] + "Y"))
        if mirax_x is not None:
            return mirax_x, mirax_y, key_x

    unit = properties.get("tiff.ResolutionUnit", "").lower()
    resolution_x = _parse_float(properties.get("tiff.XResolution"))
    resolution_y = _parse_float(properties.get("tiff.YResolution"))
    if unit in _UNIT_TO_UM and resolution_x:
        mpp_x = _UNIT_TO_UM[unit] / resolution_x
        mpp_y = _UNIT_TO_UM[unit] / resolution_y if resolution_y else mpp_x
        return mpp_x, mpp_y, "tiff.XResolution"
    return None, None, None


def detect_dicom_ycbcr_quirk(path: Path, slide: openslide.OpenSlide) -> str:
    """Check whether OpenSlide shows the JPEG frames of a DICOM file in the wrong colour space.

    Args:
        path: the DICOM file OpenSlide was opened with.
        slide: the open OpenSlide handle of that file.

    Returns:
        ``"ycbcr_to_rgb"`` when OpenSlide's pixels need a YCbCr to RGB conversion, ``"none"`` when
        they already match Pillow's decode, ``"not_applicable"`` when the frames are not JPEG, or
        ``"undetermined"`` when neither hypothesis matches (a WARNING is logged).
    """
    with path.open("rb") as handle:
        dataset = pydicom.dcmread(handle, stop_before_pixels=True)
        syntax = str(dataset.file_meta.get("TransferSyntaxUID", ""))
        if syntax not in _DICOM_JPEG_SYNTAXES or int(dataset.get("SamplesPerPixel", 1)) != 3:
            return "not_applicable"
        # stop_before_pixels leaves the file at the Pixel Data element. Skipping its 12-byte header
        # (tag, VR, reserved, undefined length) puts get_frame at the Basic Offset Table item.
        handle.seek(12, io.SEEK_CUR)
        frame_bytes = get_frame(handle, 0, number_of_frames=int(dataset.get("NumberOfFrames", 1)))
    reference = np.asarray(Image.open(io.BytesIO(frame_bytes)).convert("RGB"))

    # Locate the frame: the OpenSlide level with this file's matrix size, at the frame's position.
    matrix_size = (int(dataset.TotalPixelMatrixColumns), int(dataset.TotalPixelMatrixRows))
    if matrix_size not in slide.level_dimensions:
        logger.warning("%s: no OpenSlide level has size %s; DICOM colour check skipped", path.name, matrix_size)
        return "undetermined"
    level = slide.level_dimensions.index(matrix_size)
    column, row = 0, 0
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        position = per_frame[0].PlanePositionSlideSequence[0]
        column = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
        row = int(position.RowPositionInTotalImagePixelMatrix) - 1
    height = min(reference.shape[0], matrix_size[1] - row)
    width = min(reference.shape[1], matrix_size[0] - column)
    downsample = slide.level_downsamples[level]
    location = (int(round(column * downsample)), int(round(row * downsample)))
    shown = np.asarray(slide.read_region(location, level, (width, height)))[..., :3]
    reference = reference[:height, :width].astype(np.int16)

    converted = np.asarray(Image.fromarray(np.ascontiguousarray(shown), "YCbCr").convert("RGB"))
    error_as_is = float(np.abs(shown.astype(np.int16) - reference).mean())
    error_converted = float(np.abs(converted.astype(np.int16) - reference).mean())
    logger.debug(
        "%s: DICOM colour check, error as is %.2f, after YCbCr->RGB %.2f", path.name, error_as_is, error_converted
    )
    if error_as_is <= _COLOUR_MATCH_TOLERANCE and error_as_is <= error_converted:
        return "none"
    if error_converted <= _COLOUR_MATCH_TOLERANCE:
        return "ycbcr_to_rgb"
    logger.warning(
        "%s: OpenSlide pixels of frame 0 match neither the JPEG decode (error %.1f) nor its YCbCr "
        "conversion (error %.1f); colours are used as OpenSlide returns them",
        path.name,
        error_as_is,
        error_converted,
    )
    return "undetermined"


class OpenSlideReader(SlideReader):
    """Slide reader backed by OpenSlide.

    For DICOM the result of the colour check is stored in ``properties["virchow.dicom-colour-check"]``
    and an applied conversion is listed in :attr:`pixel_corrections`.

    Args:
        path: slide file (for DICOM, one ``.dcm`` file of the series, preferably level 0).
        mpp: pixel size override in um/px at level 0.

    Raises:
        UnsupportedFormatError: OpenSlide does not recognise the file.
        SlideReadError: OpenSlide recognises the file but fails to open it.
    """

    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._lock = threading.Lock()
        self._slide = self._open()

        self._level_dimensions = [tuple(map(int, dims)) for dims in self._slide.level_dimensions]
        self._level_downsamples = [float(ds) for ds in self._slide.level_downsamples]
        self._properties = {str(key): str(value) for key, value in self._slide.properties.items()}
        self._vendor = self._properties.get(openslide.PROPERTY_NAME_VENDOR)
        self._set_mpp(*mpp_from_openslide_properties(self._properties))
        self._bounds = self._read_bounds()

        self._ycbcr_to_rgb = False
        if self._vendor == "dicom":
            try:
                decision = detect_dicom_ycbcr_quirk(self._path, self._slide)
            except _DICOM_CHECK_ERRORS as exc:
                logger.warning(
                    "%s: DICOM colour check failed (%s: %s); colours are used as OpenSlide returns them",
                    self._path.name,
                    type(exc).__name__,
                    exc,
                )
                decision = "undetermined"
            self._properties["virchow.dicom-colour-check"] = decision
            if decision == "ycbcr_to_rgb":
                self._ycbcr_to_rgb = True
                self._pixel_corrections.append("dicom_ycbcr_to_rgb")
                logger.warning(
                    "%s: DICOM header declares RGB but the JPEG frames are YCbCr; converting OpenSlide's "
                    "pixels from YCbCr to RGB",
                    self._path.name,
                )

    def _open(self) -> openslide.OpenSlide:
        try:
            return openslide.OpenSlide(str(self._path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError(f"OpenSlide does not recognise the format of {self._path}") from exc
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"OpenSlide failed to open {self._path}: {exc}") from exc

    def _read_bounds(self) -> tuple[int, int, int, int]:
        width, height = self.dimensions
        keys = ("x", "y", "width", "height")
        values = [self._properties.get(f"openslide.bounds-{key}") for key in keys]
        if any(value is None for value in values):
            return (0, 0, width, height)
        x, y, bounds_w, bounds_h = (int(value) for value in values)
        # Clip to level 0: a bounds rectangle reaching outside the image would pad tiles with white.
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(width, x + bounds_w), min(height, y + bounds_h)
        if x1 <= x0 or y1 <= y0:
            logger.warning("%s: ignoring empty OpenSlide bounds %s", self._path.name, values)
            return (0, 0, width, height)
        return (x0, y0, x1 - x0, y1 - y0)

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """Scanned area as level-0 (x, y, width, height) from ``openslide.bounds-*``; the whole slide when absent."""
        return self._bounds

    def level_reads_exact(self, level: int) -> bool:
        """Return True when ``level``'s downsample is an integer, so OpenSlide reads fall on its pixel grid."""
        self._check_level(level)
        downsample = self._level_downsamples[level]
        return abs(downsample - round(downsample)) < 1e-9

    def _read_level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        downsample = self._level_downsamples[level]
        # OpenSlide starts the read at level coordinate location / downsample and interpolates
        # when that is not an integer. With an integer downsample this location is exact. With a
        # fractional one (DICOM or Aperio levels such as 2.0005) the read is shifted by less than
        # half a level pixel and resampled, so tile planning skips such levels.
        location = (int(round(x * downsample)), int(round(y * downsample)))
        try:
            rgba = self._read_rgba(location, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise TileReadError(
                f"OpenSlide failed to decode {self._path.name} at level-0 (x, y)={location}, "
                f"level {level}, (width, height)=({width}, {height}): {exc}"
            ) from exc
        if self._ycbcr_to_rgb:
            rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgba[..., :3]), "YCbCr").convert("RGB"))
            rgba = np.dstack([rgb, rgba[..., 3]])
        return composite_on_white(rgba)

    def _read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read RGBA pixels, retrying once on a private handle after an OpenSlide error.

        An OpenSlide handle stays in the error state after a failed read, so every later read on
        it fails, including reads of healthy tiles from other threads. After a failure the shared
        handle is replaced, and the read is repeated on a handle no other thread uses: a second
        failure means the region itself is damaged.
        """
        shared = self._slide
        try:
            return np.asarray(shared.read_region(location, level, size))
        except openslide.OpenSlideError as exc:
            logger.debug("%s: OpenSlide read at %s failed (%s); retrying", self._path.name, location, exc)
        self._replace_handle(shared)
        private = self._open()
        try:
            return np.asarray(private.read_region(location, level, size))
        finally:
            private.close()

    def _replace_handle(self, failed: openslide.OpenSlide) -> None:
        """Swap in a new shared handle unless another thread already replaced ``failed``.

        The failed handle is not closed because other threads may still be reading from it.
        openslide-python closes it when the last reference goes.
        """
        with self._lock:
            if self._slide is failed:
                self._slide = self._open()

    def _close(self) -> None:
        self._slide.close()
