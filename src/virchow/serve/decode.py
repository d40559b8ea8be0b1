"""Decoding of untrusted image rows: base64 text to bytes, and bytes to an RGB image under limits.

An image is opened lazily first, so only its header is parsed: the format must be one of the accepted
ones and the declared width x height must be within ``max_pixels`` before any pixel is decoded. A
decompression bomb (a small file that declares a huge image) is therefore rejected without allocating
its pixels. Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``, a warning above it and an error
above twice it) stays in force as a second limit; :func:`raise_pillow_limit` lifts it to ours.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from virchow.errors import ImageDecodeError
from virchow.preprocess import to_rgb
from virchow.serve.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII | re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
# Exceptions Pillow's decoders raise for malformed data; SyntaxError and struct.error come from plugin parsers.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, ImageDecodeError)


@dataclass(frozen=True)
class ImageLimits:
    """Limits applied to every image row.

    Attributes:
        max_bytes: size limit of the encoded file.
        max_pixels: limit of width x height as declared in the header.
        formats: accepted Pillow format names, for example ``("PNG", "JPEG")``.
    """

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    formats: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")


def is_url(text: str) -> bool:
    """Return True when a row is an http(s) URL rather than base64 data."""
    return text[:8].lower().startswith(("http://", "https://"))


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Decode a base64 row, with or without a ``data:image/...;base64,`` prefix.

    Standard and URL-safe alphabets are accepted, as are line breaks (``base64.encodebytes`` output)
    and missing ``=`` padding.

    Raises:
        PayloadTooLargeError: the decoded size would exceed ``max_bytes``; checked before decoding.
        BadRequestError: the text is not valid base64 or is empty.
    """
    if text[:5].lower() == "data:":
        match = _DATA_URI.match(text)
        if match is None or match.group(3) is None:
            raise BadRequestError("data URI is not of the form data:image/TYPE;base64,DATA", code="invalid_base64")
        text = text[match.end() :]
    if _WHITESPACE.search(text):
        text = _WHITESPACE.sub("", text)
    if not text:
        raise BadRequestError("image data is empty", code="invalid_base64")
    if len(text) // 4 * 3 > max_bytes + 2:
        raise PayloadTooLargeError(
            f"the image is about {len(text) // 4 * 3} bytes after base64 decoding, over the limit of {max_bytes}",
            code="image_too_large",
        )
    remainder = len(text) % 4
    if remainder == 1:
        raise BadRequestError("invalid base64: the length is not possible for base64 data", code="invalid_base64")
    if remainder:
        text += "=" * (4 - remainder)
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        data = base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"invalid base64: {exc}", code="invalid_base64") from None
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"the image has {len(data)} bytes, over the limit of {max_bytes}", code="image_too_large"
        )
    return data


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode image bytes to 8-bit RGB, checking format and size from the header before decoding.

    Multi-page files (TIFF) contribute their first page.

    Raises:
        PayloadTooLargeError: the file or its declared pixel count is over the limit.
        UnsupportedMediaTypeError: the bytes are not an image in one of the accepted formats.
        BadRequestError: the file is truncated or corrupt.
    """
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"the image has {len(data)} bytes, over the limit of {limits.max_bytes}", code="image_too_large"
        )
    accepted = ", ".join(limits.formats)
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except UnidentifiedImageError:
        raise UnsupportedMediaTypeError(f"the data is not an image in an accepted format ({accepted})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"the image declares too many pixels: {exc}", code="image_too_many_pixels") from None
    except _DECODE_ERRORS as exc:
        raise BadRequestError(f"the image header is invalid: {exc}", code="invalid_image") from None

    # The image is not closed: its file is an in-memory buffer, and close() would also free the
    # decoded pixels that to_rgb() may return unchanged.
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadRequestError(f"the image declares an empty size {width} x {height}", code="invalid_image")
    if width * height > limits.max_pixels:
        raise PayloadTooLargeError(
            f"the {image.format} image declares {width} x {height} = {width * height} pixels, over the limit "
            f"of {limits.max_pixels}",
            code="image_too_many_pixels",
        )
    try:
        image.load()
        return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"the image declares too many pixels: {exc}", code="image_too_many_pixels") from None
    except _DECODE_ERRORS as exc:
        raise BadRequestError(
            f"the {image.format} image is truncated or corrupt: {exc}", code="invalid_image"
        ) from None


def raise_pillow_limit(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb threshold to ``max_pixels`` if it is lower; for server entry points."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
