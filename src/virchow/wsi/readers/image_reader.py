"""Pillow backend for PNG and JPEG images: one level, decoded once into memory."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from virchow.errors import SlideReadError, UnsupportedFormatError
from virchow.wsi.readers.base import SlideReader, composite_on_white

logger = logging.getLogger(__name__)

_MODES_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageReader(SlideReader):
    """Slide reader for a PNG or JPEG file.

    The pixel size comes from the override, else from the PNG ``pHYs`` chunk (unit metre) or the
    JPEG JFIF density (dots per inch or per cm). Densities outside the plausible microscope range,
    such as the common 72 or 96 dpi defaults, are ignored, so :attr:`mpp` is then None. The EXIF
    orientation, when present, is applied as an image viewer would.

    Args:
        path: PNG or JPEG file.
        mpp: pixel size override in um/px.

    Raises:
        UnsupportedFormatError: Pillow cannot identify the file or its pixel type.
        SlideReadError: the image exceeds Pillow's decompression-bomb limit or fails to decode.
    """

    backend = "pil"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(self._path) as image:
                    self._check_size(image)
                    image_format = image.format or "unknown"
                    dpi = image.info.get("dpi")
                    image.load()
                    self._rgb = self._to_rgb(ImageOps.exif_transpose(image))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise SlideReadError(
                f"{self._path} exceeds Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels; "
                "store an image this large as a tiled pyramidal TIFF"
            ) from exc
        except UnidentifiedImageError as exc:
            raise UnsupportedFormatError(f"Pillow cannot identify {self._path} as an image") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise SlideReadError(f"Pillow failed to decode {self._path}: {exc}") from exc

        height, width = self._rgb.shape[:2]
        self._level_dimensions = [(width, height)]
        self._level_downsamples = [1.0]
        self._vendor = image_format.lower()
        self._properties = {"pil.format": image_format}
        mpp_x = mpp_y = None
        source = None
        if dpi and dpi[0] and dpi[1]:
            self._properties["pil.dpi"] = f"{float(dpi[0]):.6g},{float(dpi[1]):.6g}"
            mpp_x, mpp_y = 25400.0 / float(dpi[0]), 25400.0 / float(dpi[1])
            source = "png.pHYs" if image_format == "PNG" else f"{image_format.lower()}.dpi"
        self._set_mpp(mpp_x, mpp_y, source)

    def _check_size(self, image: Image.Image) -> None:
        limit = Image.MAX_IMAGE_PIXELS
        width, height = image.size
        if limit is not None and width * height > limit:
            raise SlideReadError(
                f"{self._path} is {width}x{height} = {width * height} pixels, over Pillow's decompression-bomb "
                f"limit of {limit} pixels; store an image this large as a tiled pyramidal TIFF"
            )

    def _to_rgb(self, image: Image.Image) -> np.ndarray:
        if image.mode.startswith("I;16"):
            grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        if image.mode in {"I", "F"}:
            raise UnsupportedFormatError(
                f"{self._path} has {image.mode!r} pixels (32-bit); convert it to 8-bit RGB or greyscale"
            )
        has_alpha = image.mode in _MODES_WITH_ALPHA or (image.mode == "P" and "transparency" in image.info)
        if has_alpha:
            return composite_on_white(np.asarray(image.convert("RGBA")))
        return np.asarray(image.convert("RGB"))

    def _read_level_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        image_h, image_w = self._rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, image_w), min(y + height, image_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def _close(self) -> None:
        self._rgb = np.empty((0, 0, 3), dtype=np.uint8)
