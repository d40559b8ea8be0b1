"""Tile grid geometry and tile pixels: single reads, region reads, resampling, edges, damaged tiles."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from virchow.errors import TileReadError
from virchow.wsi.readers import OpenSlideReader, open_slide
from virchow.wsi.resolution import plan_resolution
from virchow.wsi.tiling import (
    DEFAULT_MIN_TISSUE,
    group_tiles_into_regions,
    plan_tiles,
    read_tile,
    read_tiles_from_region,
)
from virchow.wsi.tissue import detect_tissue

from .fixtures import CMU_SVS, DICOM_LEVEL0, NDPI, TCGA_SVS, cmu_pixels


def _grid(path, mpp=None, **kwargs):
    reader = open_slide(path, mpp=mpp)
    plan = plan_resolution(reader)
    grid = plan_tiles(reader, plan, detect_tissue(reader), **kwargs)
    return reader, plan, grid


def test_cmu_grid_is_level0_and_inside_slide():
    reader, plan, grid = _grid(CMU_SVS)
    with reader:
        assert grid.coords.dtype == np.int64
        assert grid.coords.shape == (len(grid), 2)
        assert 30 < len(grid) < 80
        assert (grid.coords % 224 == 0).all()
        assert (grid.coords[:, 0] + plan.patch_size_level0 <= 2220).all()
        assert (grid.coords[:, 1] + plan.patch_size_level0 <= 2967).all()
        assert (grid.tissue_fraction >= DEFAULT_MIN_TISSUE).all()
        assert (grid.padded_fraction == 0).all()
        assert grid.params["edge"] == "drop"
        assert grid.params["min_tissue"] == DEFAULT_MIN_TISSUE


def test_grid_is_row_major():
    reader, _, grid = _grid(CMU_SVS)
    reader.close()
    order = np.lexsort((grid.coords[:, 0], grid.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(grid)))


def test_ndpi_grid_on_level1_pixels():
    reader, plan, grid = _grid(NDPI)
    with reader:
        assert plan.level == 1
        assert (grid.coords % 2 == 0).all()
        assert (grid.coords % 490 == 0).all()
        assert (grid.coords + 490 <= np.array([3968, 4864])).all()


def test_edge_pad_keeps_partial_tiles():
    reader, plan, dropped = _grid(CMU_SVS, min_tissue=0.0)
    with reader:
        padded = plan_tiles(reader, plan, detect_tissue(reader), min_tissue=0.0, edge="pad")
        assert len(dropped) == (2220 // 224) * (2967 // 224)
        assert len(padded) == 10 * 14
        assert padded.padded_fraction.max() > 0
        edge_index = int(np.argmax(padded.coords[:, 0]))
        x, y = padded.coords[edge_index]
        tile = read_tile(reader, plan, (x, y))
        inside = 2220 - x
        assert (tile[:, inside:] == 255).all()
        np.testing.assert_array_equal(tile[:, :inside], cmu_pixels()[y : y + 224, x:2220])


def test_overlap_shrinks_stride():
    reader, plan, grid = _grid(CMU_SVS, overlap=112, min_tissue=0.0)
    with reader:
        assert grid.params["stride_level"] == 112
        xs = np.unique(grid.coords[:, 0])
        assert (np.diff(xs) == 112).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"overlap": 224}, "overlap"), ({"min_tissue": 1.5}, "min_tissue"), ({"edge": "wrap"}, "edge")],
)
def test_invalid_grid_arguments(kwargs, match):
    with open_slide(CMU_SVS) as reader:
        plan = plan_resolution(reader)
        with pytest.raises(ValueError, match=match):
            plan_tiles(reader, plan, detect_tissue(reader, "none"), **kwargs)


def test_cmu_tile_equals_raw_pixels():
    reader, plan, grid = _grid(CMU_SVS)
    with reader:
        x, y = grid.coords[len(grid) // 2]
        tile = read_tile(reader, plan, (x, y))
    assert tile.shape == (224, 224, 3)
    np.testing.assert_array_equal(tile, cmu_pixels()[y : y + 224, x : x + 224])


def test_ndpi_tile_is_area_resized_level1_read():
    reader, plan, grid = _grid(NDPI)
    with reader:
        x, y = grid.coords[0]
        raw = reader.read_region((x, y), 1, (245, 245))
        tile = read_tile(reader, plan, (x, y))
    np.testing.assert_array_equal(tile, cv2.resize(raw, (224, 224), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize(
    ("path", "mpp"),
    [(CMU_SVS, None), (NDPI, None), (DICOM_LEVEL0, None), (TCGA_SVS, 0.25)],
    ids=["svs", "ndpi-level1", "dicom", "tcga-override"],
)
def test_region_read_equals_single_reads(path, mpp):
    reader, plan, grid = _grid(path, mpp=mpp)
    with reader:
        groups = group_tiles_into_regions(reader, plan, grid.coords, tiles_per_side=3)
        for region_xy, indices in groups[:4]:
            batch = read_tiles_from_region(reader, plan, region_xy, grid.coords[indices])
            singles = np.stack([read_tile(reader, plan, xy) for xy in grid.coords[indices]])
            np.testing.assert_array_equal(batch, singles)


@pytest.mark.parametrize("fixture_name", ["ome_tiff", "flat_tiff"])
def test_region_read_equals_single_reads_tifffile(fixture_name, request):
    reader, plan, grid = _grid(request.getfixturevalue(fixture_name))
    with reader:
        assert reader.backend == "tifffile"
        region_xy, indices = group_tiles_into_regions(reader, plan, grid.coords)[0]
        batch = read_tiles_from_region(reader, plan, region_xy, grid.coords[indices])
        for tile, (x, y) in zip(batch, grid.coords[indices], strict=True):
            np.testing.assert_array_equal(tile, read_tile(reader, plan, (x, y)))
            np.testing.assert_array_equal(tile, cmu_pixels()[y : y + 224, x : x + 224])


def test_groups_cover_every_tile_once():
    reader, plan, grid = _grid(CMU_SVS, min_tissue=0.0)
    with reader:
        groups = group_tiles_into_regions(reader, plan, grid.coords, tiles_per_side=4)
    indices = np.concatenate([group[1] for group in groups])
    np.testing.assert_array_equal(np.sort(indices), np.arange(len(grid)))
    for region_xy, group in groups:
        assert (grid.coords[group] >= np.array(region_xy)).all()
        assert (grid.coords[group] - np.array(region_xy)).max() < 4 * 224


def test_tile_outside_region_raises():
    with open_slide(CMU_SVS) as reader:
        plan = plan_resolution(reader)
        with pytest.raises(ValueError, match="region"):
            read_tiles_from_region(reader, plan, (224, 224), np.array([[0, 0]]))


def test_empty_mask_gives_empty_grid(blank_png):
    with open_slide(blank_png, mpp=0.5) as reader:
        plan = plan_resolution(reader)
        grid = plan_tiles(reader, plan, detect_tissue(reader))
        assert len(grid) == 0
        assert grid.coords.shape == (0, 2)
        assert read_tiles_from_region(reader, plan, (0, 0), grid.coords).shape == (0, 224, 224, 3)


def test_corrupt_tile_fails_only_there(corrupt_tile_svs):
    path, (x, y, width, height) = corrupt_tile_svs
    with OpenSlideReader(path) as reader:
        plan = plan_resolution(reader)
        grid = plan_tiles(reader, plan, detect_tissue(reader, "none"), min_tissue=0.0)
        overlaps = (
            (grid.coords[:, 0] < x + width)
            & (grid.coords[:, 0] + 224 > x)
            & (grid.coords[:, 1] < y + height)
            & (grid.coords[:, 1] + 224 > y)
        )
        assert overlaps.any()
        for xy in grid.coords[overlaps]:
            with pytest.raises(TileReadError):
                read_tile(reader, plan, xy)
        healthy = grid.coords[~overlaps][:20]
        for x0, y0 in healthy:
            np.testing.assert_array_equal(read_tile(reader, plan, (x0, y0)), cmu_pixels()[y0 : y0 + 224, x0 : x0 + 224])
        with pytest.raises(TileReadError):
            read_tiles_from_region(reader, plan, (0, 0), grid.coords[overlaps | (np.arange(len(grid)) == 0)])


def test_grid_and_mask_respect_bounds():
    with open_slide(CMU_SVS) as reader:
        reader._bounds = (300, 400, 1500, 2000)  # as openslide.bounds-* would set for an MRXS
        plan = plan_resolution(reader)
        mask = detect_tissue(reader, "none")
        grid = plan_tiles(reader, plan, mask, min_tissue=0.0)
    assert mask.origin == (300, 400)
    assert mask.mask.shape == (125, 94)
    assert len(grid) == (1500 // 224) * (2000 // 224)
    assert grid.coords[:, 0].min() == 300
    assert grid.coords[:, 1].min() == 400
    assert (grid.coords[:, 0] + 224 <= 1800).all()
    assert (grid.coords[:, 1] + 224 <= 2400).all()
    assert (grid.tissue_fraction == 1.0).all()
