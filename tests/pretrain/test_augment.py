"""Multi-crop geometry, pathology augmentations and iBOT block masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virchow.pretrain.augment import (
    BlockMaskGenerator,
    MultiCropAugmentation,
    adjust_hue,
    extended_context_box,
    random_resized_box,
)
from virchow.pretrain.config import CropsConfig

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def gradient_image(size: int = 392) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def plain(**changes) -> CropsConfig:
    """Crops without photometric changes, so that geometry can be checked pixel by pixel."""
    values = dict(color_jitter=0.0, grayscale=0.0, blur_global=(0.0, 0.0), blur_local=0.0, solarize=0.0)
    values.update(changes)
    return CropsConfig(**values)


def test_crop_shapes_and_normalisation():
    augment = MultiCropAugmentation(CropsConfig(n_local=3), MEAN, STD)
    crops = augment(gradient_image(), np.random.default_rng(0))
    assert crops.global_crops.shape == (2, 3, 224, 224)
    assert crops.local_crops.shape == (3, 3, 98, 98)
    assert crops.global_crops.dtype == torch.float32
    assert crops.global_crops.min() >= (0 - 0.5) / 0.25 - 1e-5
    assert crops.global_crops.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_same_seed_same_crops():
    augment = MultiCropAugmentation(CropsConfig(n_local=2), MEAN, STD)
    first = augment(gradient_image(), np.random.default_rng([7, 3]))
    second = augment(gradient_image(), np.random.default_rng([7, 3]))
    other = augment(gradient_image(), np.random.default_rng([7, 4]))
    assert torch.equal(first.global_crops, second.global_crops)
    assert torch.equal(first.local_crops, second.local_crops)
    assert not torch.equal(first.global_crops, other.global_crops)


def test_no_local_crops():
    augment = MultiCropAugmentation(CropsConfig(n_local=0), MEAN, STD)
    assert augment(gradient_image(), np.random.default_rng(0)).local_crops.shape == (0, 3, 98, 98)


@pytest.mark.parametrize("seed", range(20))
def test_extended_context_box_keeps_scale(seed):
    rng = np.random.default_rng(seed)
    top, left, height, width = extended_context_box(392, 392, 224, (0.9, 1.1), (0.95, 1.05), rng)
    # side = 224 x scale; width = side x sqrt(ratio), height = side / sqrt(ratio)
    low, high = 0.9 * 224 / 1.05**0.5 - 1, 1.1 * 224 * 1.05**0.5 + 1
    assert low <= height <= high
    assert low <= width <= high
    assert 0.9 * 224 - 1 <= (height * width) ** 0.5 <= 1.1 * 224 + 1
    assert 0.95 - 0.02 <= width / height <= 1.05 + 0.02
    assert 0 <= top <= 392 - height
    assert 0 <= left <= 392 - width


def test_extended_context_box_shrinks_to_small_source():
    top, left, height, width = extended_context_box(224, 224, 224, (1.1, 1.1), (1.0, 1.0), np.random.default_rng(0))
    assert (top, left, height, width) == (0, 0, 224, 224)


@pytest.mark.parametrize("seed", range(20))
def test_random_resized_box_area_in_scale(seed):
    top, left, height, width = random_resized_box(300, 200, (0.32, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed))
    assert top >= 0
    assert top + height <= 300
    assert left >= 0
    assert left + width <= 200
    assert height * width >= 0.3 * 300 * 200


def test_extended_context_crop_is_translated_not_resized():
    # With scale and ratio fixed at 1 the crop is an exact window of the source.
    cfg = plain(mode="extended_context", ect_scale=(1.0, 1.0), ect_ratio=(1.0, 1.0), horizontal_flip=0.0, n_local=0)
    augment = MultiCropAugmentation(cfg, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    image = gradient_image()
    crop = augment(image, np.random.default_rng(5)).global_crops[0].permute(1, 2, 0).numpy()
    crop_u8 = np.rint(crop * 255).astype(np.uint8)
    found = [
        (top, left)
        for top in range(0, 392 - 224 + 1)
        for left in (int(np.argmax(image[top, :, 0] == crop_u8[0, 0, 0])),)
        if np.array_equal(image[top : top + 224, left : left + 224], crop_u8)
    ]
    assert found


def test_vertical_flip_flips_rows():
    source = gradient_image(224)
    identity = plain(horizontal_flip=0.0, vertical_flip=0.0, global_scale=(1.0, 1.0), n_local=0)
    flipped = plain(horizontal_flip=0.0, vertical_flip=1.0, global_scale=(1.0, 1.0), n_local=0)
    base = MultiCropAugmentation(identity, MEAN, STD)(source, np.random.default_rng(1)).global_crops[0]
    flip = MultiCropAugmentation(flipped, MEAN, STD)(source, np.random.default_rng(1)).global_crops[0]
    assert torch.equal(flip, base.flip(-2))


def test_rotate90_keeps_pixels():
    source = gradient_image(224)
    cfg = plain(horizontal_flip=0.0, rotate90=True, global_scale=(1.0, 1.0), n_local=0)
    crop = MultiCropAugmentation(cfg, MEAN, STD)(source, np.random.default_rng(2)).global_crops[0]
    base = torch.from_numpy(((source.astype(np.float32) / 255 - 0.5) / 0.25).transpose(2, 0, 1))
    assert any(torch.allclose(crop, torch.rot90(base, k, dims=(1, 2)), atol=1e-5) for k in range(4))


def test_hue_shift_full_turn_is_identity():
    image = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    assert np.allclose(adjust_hue(image, 0.5), adjust_hue(adjust_hue(image, 0.25), 0.25), atol=1e-4)
    assert not np.allclose(adjust_hue(image, 0.25), image, atol=1e-3)


def test_block_mask_count_and_shape():
    generator = BlockMaskGenerator((16, 16))
    for seed in range(10):
        mask = generator(60, np.random.default_rng(seed))
        assert mask.shape == (256,)
        assert 30 <= mask.sum() <= 60


def test_mask_probability_zero_masks_nothing():
    generator = BlockMaskGenerator((8, 8))
    assert not generator.sample((0.1, 0.5), 0.0, np.random.default_rng(0)).any()
