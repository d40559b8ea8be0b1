"""Tissue detection: Otsu on real slides and blank glass, whole-slide and user masks, GeoJSON export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from virchow.errors import ConfigError
from virchow.wsi.readers import open_slide
from virchow.wsi.tissue import OtsuParams, TissueMask, detect_tissue, otsu_tissue_mask, write_geojson

from .fixtures import CMU_SVS, NDPI, TCGA_SVS


@pytest.fixture(scope="module")
def cmu_tissue() -> TissueMask:
    with open_slide(CMU_SVS) as reader:
        return detect_tissue(reader)


def test_otsu_finds_tissue_on_cmu(cmu_tissue):
    assert cmu_tissue.method == "otsu"
    assert 0.2 < cmu_tissue.tissue_fraction < 0.5
    assert cmu_tissue.mask.shape == (186, 139)
    assert cmu_tissue.downsample == pytest.approx(8.0 / 0.499)
    assert cmu_tissue.mpp == pytest.approx(8.0)
    assert cmu_tissue.contours
    assert cmu_tissue.params["otsu_threshold"] >= OtsuParams().min_saturation
    assert cmu_tissue.params["damaged_regions"] == []


def test_cmu_background_corner_is_not_tissue(cmu_tissue):
    # The left third of CMU-1-Small-Region is glass apart from a thin strand.
    assert cmu_tissue.mask[:, :30].mean() < 0.05
    assert cmu_tissue.mask[100:, 60:100].mean() > 0.8


def test_contours_are_level0(cmu_tissue):
    points = np.concatenate([polygon.exterior for polygon in cmu_tissue.contours])
    assert points[:, 0].max() <= 2220 + cmu_tissue.downsample
    assert points[:, 1].max() <= 2967 + cmu_tissue.downsample
    assert points[:, 0].max() > 1000


def test_blank_glass_gives_empty_mask(blank_png):
    with open_slide(blank_png, mpp=0.5) as reader:
        mask = detect_tissue(reader)
    assert mask.is_empty
    assert mask.contours == []


def test_blank_array_gives_empty_mask():
    rng = np.random.default_rng(1)
    image = (240 + rng.integers(-6, 7, size=(300, 400, 3))).astype(np.uint8)
    mask, threshold = otsu_tissue_mask(image, OtsuParams())
    assert not mask.any()
    assert threshold >= 20


def test_transparent_background_is_not_tissue(rgba_png):
    with open_slide(rgba_png) as reader:
        mask = detect_tissue(reader)
    corner = mask.mask[:5, :5]
    assert not corner.any()
    assert mask.tissue_fraction > 0.1


def test_fluorescence_dark_background_is_not_all_tissue():
    with open_slide(NDPI) as reader:
        mask = detect_tissue(reader)
    assert 0.05 < mask.tissue_fraction < 0.9


def test_no_mpp_uses_fixed_thumbnail_size(caplog):
    with open_slide(TCGA_SVS) as reader:
        mask = detect_tissue(reader)
    assert max(mask.mask.shape) <= 2048
    assert mask.mpp is None
    assert mask.tissue_fraction > 0.3
    assert any("no pixel size" in record.message for record in caplog.records)


def test_method_none_covers_bounds():
    with open_slide(CMU_SVS) as reader:
        mask = detect_tissue(reader, "none")
    assert mask.mask.all()
    assert mask.tissue_fraction == 1.0
    assert len(mask.contours) == 1


def test_geojson_round_trip(cmu_tissue, tmp_path):
    path = write_geojson(cmu_tissue, tmp_path / "tissue.geojson")
    document = json.loads(path.read_text())
    assert document["type"] == "FeatureCollection"
    feature = document["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]

    with open_slide(CMU_SVS) as reader:
        restored = detect_tissue(reader, "mask", mask_path=path, mask_classification="Tissue")
    intersection = (restored.mask & cmu_tissue.mask).sum()
    union = (restored.mask | cmu_tissue.mask).sum()
    assert intersection / union > 0.85


def test_geojson_offset_is_subtracted(cmu_tissue, tmp_path):
    plain = json.loads(write_geojson(cmu_tissue, tmp_path / "a.geojson").read_text())
    shifted = json.loads(write_geojson(cmu_tissue, tmp_path / "b.geojson", offset=(100, 50)).read_text())
    first_plain = plain["features"][0]["geometry"]["coordinates"][0][0]
    first_shifted = shifted["features"][0]["geometry"]["coordinates"][0][0]
    assert first_plain[0] - first_shifted[0] == pytest.approx(100)
    assert first_plain[1] - first_shifted[1] == pytest.approx(50)


def test_geojson_polygon_with_hole(tmp_path):
    polygon = {
        "type": "Polygon",
        "coordinates": [
            [[0, 0], [2000, 0], [2000, 2000], [0, 2000], [0, 0]],
            [[500, 500], [1500, 500], [1500, 1500], [500, 1500], [500, 500]],
        ],
    }
    path = tmp_path / "annotation.geojson"
    path.write_text(json.dumps([{"type": "Feature", "geometry": polygon, "properties": {}}]))
    with open_slide(CMU_SVS) as reader:
        mask = detect_tissue(reader, "mask", mask_path=path)
    expected = (2000**2 - 1000**2) / (2220 * 2967)
    assert mask.tissue_fraction == pytest.approx(expected, rel=0.05)
    assert len(mask.contours[0].holes) == 1


def test_png_mask_any_size(tmp_path):
    path = tmp_path / "left-half.png"
    mask_image = np.zeros((297, 222), dtype=np.uint8)
    mask_image[:, :111] = 1
    Image.fromarray(mask_image).save(path)
    with open_slide(CMU_SVS) as reader:
        mask = detect_tissue(reader, "mask", mask_path=path)
    columns = mask.mask.mean(axis=0)
    assert columns[:65].min() == 1.0
    assert columns[75:].max() == 0.0


def test_png_mask_with_wrong_aspect_raises(tmp_path):
    path = tmp_path / "square.png"
    Image.new("L", (100, 100), 255).save(path)
    with open_slide(CMU_SVS) as reader, pytest.raises(ConfigError, match="aspect ratio"):
        detect_tissue(reader, "mask", mask_path=path)


def test_mask_method_needs_path():
    with open_slide(CMU_SVS) as reader, pytest.raises(ConfigError, match="mask_path"):
        detect_tissue(reader, "mask")


def test_unknown_method_raises():
    with open_slide(CMU_SVS) as reader, pytest.raises(ConfigError, match="otsu"):
        detect_tissue(reader, "deep")  # type: ignore[arg-type]


def test_damaged_region_recorded(corrupt_tile_svs):
    path, (x, y, width, height) = corrupt_tile_svs
    with open_slide(path) as reader:
        mask = detect_tissue(reader)
    damaged = mask.params["damaged_regions"]
    assert damaged
    assert all(dx < x + width and dy < y + height for dx, dy, _, _ in damaged)
    assert mask.tissue_fraction > 0.2


def test_tile_fractions_exact_on_synthetic_mask():
    grid = np.zeros((10, 10), dtype=bool)
    grid[2:6, 2:6] = True
    mask = TissueMask(
        mask=grid,
        downsample=10.0,
        origin=(0, 0),
        bounds=(0, 0, 100, 100),
        mpp=None,
        method="test",
        params={},
        contours=[],
    )
    coords = np.array([[20, 20], [0, 0], [15, 15], [50, 50], [95, 95]])
    fractions = mask.tile_fractions(coords, 20.0)
    np.testing.assert_allclose(fractions, [1.0, 0.0, 0.5625, 0.25, 0.0])


def test_attrs_are_json_serialisable(cmu_tissue):
    attrs = json.loads(json.dumps(cmu_tissue.attrs()))
    assert attrs["method"] == "otsu"
    assert json.loads(attrs["params_json"])["min_saturation"] == 20
