"""Base64 and image decoding of rows, without a server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from virchow.serve.decode import ImageLimits, decode_base64, is_url, open_image
from virchow.serve.errors import BadRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

from .serve_harness import png_declaring

DATA = bytes(range(256)) * 4


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(DATA).decode(),
        base64.urlsafe_b64encode(DATA).decode(),
        base64.b64encode(DATA).decode().rstrip("="),
        base64.encodebytes(DATA).decode(),
        "data:image/png;base64," + base64.b64encode(DATA).decode(),
        "DATA:image/tiff;name=a.tif;base64," + base64.b64encode(DATA).decode(),
    ],
    ids=["standard", "url-safe", "no padding", "line breaks", "data URI", "data URI with parameter"],
)
def test_base64_forms(text):
    assert decode_base64(text, max_bytes=len(DATA)) == DATA


@pytest.mark.parametrize(
    "text",
    ["@@@", "abcde", "data:image/png,notbase64", "data:;base64", "", "   ", "aGVsbG8=é"],
    ids=["symbols", "impossible length", "data URI without base64", "data URI without comma", "empty", "blank", "non-ASCII"],
)
def test_base64_invalid(text):
    with pytest.raises(BadRequestError):
        decode_base64(text, max_bytes=1000)


def test_base64_size_checked_before_decoding():
    with pytest.raises(PayloadTooLargeError, match="about"):
        decode_base64("A" * 4000, max_bytes=1000)


def test_is_url():
    assert is_url("https://example.org/a.png")
    assert is_url("HTTP://example.org/a.png")
    assert not is_url("aHR0cHM6Ly9leGFtcGxl")
    assert not is_url("ftp://example.org/a.png")


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "TIFF", "BMP", "WEBP"])
def test_accepted_formats_decode_to_rgb(image_format):
    image = Image.new("RGB", (32, 24), (200, 100, 50))
    decoded = open_image(encode(image, image_format), ImageLimits())
    assert decoded.mode == "RGB"
    assert decoded.size == (32, 24)


def test_transparency_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    decoded = open_image(encode(image, "PNG"), ImageLimits())
    assert np.asarray(decoded).min() == 255


def test_sixteen_bit_png_scaled():
    image = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    decoded = open_image(encode(image, "PNG"), ImageLimits())
    assert decoded.mode == "RGB"
    assert np.asarray(decoded).min() == 255


def test_multipage_tiff_uses_first_page():
    pages = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 255, 0))]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    decoded = open_image(buffer.getvalue(), ImageLimits())
    assert tuple(np.asarray(decoded)[0, 0]) == (255, 0, 0)


def test_format_outside_configured_list():
    data = encode(Image.new("RGB", (8, 8)), "BMP")
    with pytest.raises(UnsupportedMediaTypeError, match="PNG"):
        open_image(data, ImageLimits(formats=("PNG",)))


def test_pixel_limit_is_inclusive():
    data = encode(Image.new("RGB", (100, 50)), "PNG")
    assert open_image(data, ImageLimits(max_pixels=5000)).size == (100, 50)
    with pytest.raises(PayloadTooLargeError, match="100 x 50"):
        open_image(data, ImageLimits(max_pixels=4999))


def test_bomb_rejected_from_header():
    bomb = png_declaring(60_000, 60_000)
    with pytest.raises(PayloadTooLargeError):
        open_image(bomb, ImageLimits())


def test_file_size_limit():
    data = encode(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(PayloadTooLargeError):
        open_image(data, ImageLimits(max_bytes=len(data) - 1))


def test_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(BadRequestError):
        open_image(data[: len(data) // 3], ImageLimits())
