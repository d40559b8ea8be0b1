"""Stain-space conversion and tile augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virchow.finetune.augment import TileAugment, hed_to_rgb, rgb_to_hed
from virchow.finetune.data import sample_seed


def _tile(seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=generator, dtype=torch.float64)


def test_hed_matches_scikit_image() -> None:
    color = pytest.importorskip("skimage.color")
    rgb = _tile()
    ours = rgb_to_hed(rgb).permute(1, 2, 0).numpy()
    theirs = color.rgb2hed(rgb.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    back = hed_to_rgb(torch.from_numpy(theirs).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, color.hed2rgb(theirs), atol=1e-10)


def test_unclamped_hed_round_trip_is_exact() -> None:
    rgb = _tile().clamp_min(1e-3)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(rgb, clamp=False)).numpy(), rgb.numpy(), atol=1e-10)


def test_augment_without_changes_is_identity() -> None:
    image = _tile().float()
    augment = TileAugment(flips=False, rotate90=False, color_jitter="none", blur_prob=0.0)
    assert torch.equal(augment(image, torch.Generator().manual_seed(0)), image)


@pytest.mark.parametrize("jitter", ["hed", "hsv"])
def test_augment_is_seeded_and_bounded(jitter: str) -> None:
    image = _tile().float()
    augment = TileAugment(color_jitter=jitter, color_strength=0.05, blur_prob=0.5)
    first = augment(image, torch.Generator().manual_seed(7))
    again = augment(image, torch.Generator().manual_seed(7))
    other = augment(image, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == image.shape
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0


def test_hed_jitter_keeps_tiles_recognisable() -> None:
    image = _tile().float().clamp(0.2, 0.9)
    augment = TileAugment(flips=False, rotate90=False, color_jitter="hed", color_strength=0.05, blur_prob=0.0)
    changes = [float((augment(image, torch.Generator().manual_seed(s)) - image).abs().mean()) for s in range(20)]
    assert max(changes) < 0.1
    assert min(changes) > 0.0


def test_geometric_augment_permutes_pixels() -> None:
    image = _tile().float()
    augment = TileAugment(color_jitter="none", blur_prob=0.0)
    out = augment(image, torch.Generator().manual_seed(3))
    assert torch.equal(out.flatten().sort().values, image.flatten().sort().values)


def test_sample_seed_differs_by_epoch_and_index() -> None:
    seeds = {sample_seed(0, epoch, index) for epoch in range(3) for index in range(50)}
    assert len(seeds) == 150
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
