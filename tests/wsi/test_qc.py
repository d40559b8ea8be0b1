"""QC thumbnail and overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from virchow.wsi.qc import TILE_COLOUR, TISSUE_COLOUR, draw_qc, thumbnail, write_qc_thumbnail
from virchow.wsi.readers import open_slide
from virchow.wsi.resolution import plan_resolution
from virchow.wsi.tiling import plan_tiles
from virchow.wsi.tissue import detect_tissue

from .fixtures import CMU_SVS, NDPI


def test_thumbnail_size_and_downsample():
    with open_slide(NDPI) as reader:
        image, downsample = thumbnail(reader, 512)
    assert max(image.size) == 512
    assert downsample == pytest.approx(4864 / 512)
    assert image.mode == "RGB"


def test_thumbnail_of_flat_tiff_matches_openslide(flat_tiff):
    with open_slide(flat_tiff) as flat, open_slide(CMU_SVS) as svs:
        flat_image, flat_downsample = thumbnail(flat, 300)
        svs_image, svs_downsample = thumbnail(svs, 300)
    assert flat_downsample == svs_downsample
    difference = np.abs(np.asarray(flat_image, dtype=int) - np.asarray(svs_image))
    assert difference.max() == 0


def test_qc_overlay_draws_tiles_and_contours(tmp_path):
    with open_slide(CMU_SVS) as reader:
        plan = plan_resolution(reader)
        mask = detect_tissue(reader)
        grid = plan_tiles(reader, plan, mask)
        path = write_qc_thumbnail(reader, tmp_path / "qc.png", tissue_mask=mask, tile_grid=grid, max_size=600)
        plain, _ = draw_qc(reader, max_size=600)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert max(pixels.shape[:2]) == 600
    assert (pixels == np.array(TILE_COLOUR)).all(axis=-1).sum() > 500
    assert (pixels == np.array(TISSUE_COLOUR)).all(axis=-1).sum() > 500
    assert not (np.asarray(plain) == np.array(TILE_COLOUR)).all(axis=-1).any()


def test_invalid_max_size():
    with open_slide(CMU_SVS) as reader, pytest.raises(ValueError, match="max_size"):
        thumbnail(reader, 0)
