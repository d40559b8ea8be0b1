"""Every image mode becomes a 3 x 224 x 224 tensor, and the fast path equals the official transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from virchow.errors import ImageDecodeError
from virchow.models import get_model_spec
from virchow.preprocess import array_to_image, build_transform, load_image, tiles_to_tensor, to_rgb

CONFIG = get_model_spec("virchow").preprocess


def _modes() -> dict[str, Image.Image]:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    return {
        "RGB": rgb,
        "RGBA": rgb.convert("RGBA"),
        "LA": rgb.convert("LA"),
        "L": rgb.convert("L"),
        "1": rgb.convert("1"),
        "P": rgb.convert("P"),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),
        "I": rgb.convert("I"),
        "F": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_gives_rgb_tensor(mode):
    image = _modes()[mode]
    assert image.mode == mode
    tensor = build_transform(CONFIG)(image)
    assert tuple(tensor.shape) == (3, 224, 224)
    assert tensor.dtype == torch.float32
    assert to_rgb(image).mode == "RGB"


def test_rgba_transparency_becomes_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[5, 5]) == (255, 255, 255)
    assert tuple(rgb[0, 0]) == (255, 0, 0)


def test_transparent_palette_becomes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_uses_full_range():
    image = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(image)).min() == 255


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((4, 4), 1.0, dtype=np.float32), 255),
        (np.full((4, 4, 3), 65535, dtype=np.uint16), 255),
        (np.full((4, 4, 1), 7, dtype=np.uint8), 7),
        (np.zeros((4, 4, 4), dtype=np.uint8), 255),  # fully transparent
    ],
)
def test_arrays_of_any_dtype(array, expected):
    rgb = np.asarray(array_to_image(array))
    assert rgb.shape == (4, 4, 3)
    assert rgb[0, 0, 0] == expected


def test_bad_array_shape():
    with pytest.raises(ImageDecodeError, match="shape"):
        array_to_image(np.zeros((4, 4, 5)))


def test_undecodable_file_names_it(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        load_image(path)


def test_sixteen_bit_rgb_tiff(tmp_path):
    import tifffile

    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.full((32, 32, 3), 32768, dtype=np.uint16), photometric="rgb")
    assert np.asarray(load_image(path))[0, 0, 0] == 128


def test_fast_path_equals_official_transform(labeled_tiles):
    paths = sorted((labeled_tiles / "CRC-VAL-HE-7K").rglob("*.png"))[:4]
    images = [load_image(p) for p in paths]
    assert all(image.size == (224, 224) for image in images)
    official = torch.stack([build_transform(CONFIG)(image) for image in images])
    fast = tiles_to_tensor(np.stack([np.asarray(image) for image in images]), CONFIG)
    assert torch.allclose(official, fast, atol=1e-6)


def test_fast_path_rejects_wrong_size():
    with pytest.raises(ImageDecodeError, match="224"):
        tiles_to_tensor(np.zeros((1, 256, 256, 3), dtype=np.uint8), CONFIG)


def test_official_transform_resizes_and_crops():
    image = Image.new("RGB", (512, 300), (10, 20, 30))
    assert tuple(build_transform(CONFIG)(image).shape) == (3, 224, 224)
