"""Readers on every sample slide and built fixture: geometry, pixel size, colour parity, errors."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from virchow.errors import SlideError, SlideNotFoundError, SlideReadError, TileReadError, UnsupportedFormatError
from virchow.wsi.readers import (
    SUPPORTED_EXTENSIONS,
    ImageReader,
    OpenSlideReader,
    TiffReader,
    is_supported,
    open_slide,
    openslide_reader,
)
from virchow.wsi.readers.base import composite_on_white
from virchow.wsi.readers.openslide_reader import mpp_from_openslide_properties

from .fixtures import BROKEN_SVS, CMU_MPP, CMU_SVS, DICOM_LEVEL0, NDPI, TCGA_SVS, cmu_pixels

SAMPLES = [
    # path, backend, level-0 (width, height), level count, mpp, mpp source
    (CMU_SVS, "openslide", (2220, 2967), 1, 0.499, "openslide.mpp-x"),
    (TCGA_SVS, "openslide", (4443, 3567), 2, None, None),
    (NDPI, "openslide", (3968, 4864), 7, 0.2281750559028887, "openslide.mpp-x"),
    (DICOM_LEVEL0, "openslide", (2220, 2967), 12, 0.499, "openslide.mpp-x"),
]


@pytest.mark.parametrize(
    ("path", "backend", "dimensions", "levels", "mpp", "source"), SAMPLES, ids=lambda v: getattr(v, "name", None)
)
def test_open_slide_samples(path, backend, dimensions, levels, mpp, source):
    with open_slide(path) as reader:
        assert reader.backend == backend
        assert reader.dimensions == dimensions
        assert reader.level_count == levels
        assert reader.mpp_source == source
        if mpp is None:
            assert reader.mpp is None
        else:
            assert reader.mpp == pytest.approx(mpp)
        region = reader.read_region((100, 100), 0, (64, 48))
        assert region.shape == (48, 64, 3)
        assert region.dtype == np.uint8


@pytest.mark.parametrize("path", [CMU_SVS, TCGA_SVS, NDPI], ids=lambda p: p.name)
def test_tifffile_matches_openslide(path):
    with OpenSlideReader(path) as reference, TiffReader(path) as reader:
        assert reader.dimensions == reference.dimensions
        assert reader.mpp == (pytest.approx(reference.mpp) if reference.mpp else None)
        expected = reference.read_region((1000, 900), 0, (300, 200))
        np.testing.assert_array_equal(reader.read_region((1000, 900), 0, (300, 200)), expected)


def test_tcga_has_no_mpp_and_takes_override():
    with open_slide(TCGA_SVS) as reader:
        assert reader.mpp is None
        assert reader.mpp_x is None
    with open_slide(TCGA_SVS, mpp=0.2527) as reader:
        assert reader.mpp == pytest.approx(0.2527)
        assert reader.mpp_source == "override"


def test_override_replaces_metadata_mpp():
    with open_slide(CMU_SVS, mpp=0.25) as reader:
        assert reader.mpp_x == 0.25
        assert reader.mpp_y == 0.25
        assert reader.mpp_source == "override"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_invalid_override_raises(bad):
    with pytest.raises(ValueError, match="mpp override"):
        open_slide(CMU_SVS, mpp=bad)


def test_dicom_colour_matches_svs():
    with open_slide(DICOM_LEVEL0) as dicom, open_slide(CMU_SVS) as svs:
        assert "dicom_ycbcr_to_rgb" in dicom.pixel_corrections
        assert dicom.properties["virchow.dicom-colour-check"] == "ycbcr_to_rgb"
        dicom_mean = dicom.read_region((800, 800), 0, (200, 200)).reshape(-1, 3).mean(axis=0)
        svs_mean = svs.read_region((800, 800), 0, (200, 200)).reshape(-1, 3).mean(axis=0)
    assert np.abs(dicom_mean - svs_mean).max() < 3.0


def test_dicom_lower_level_keeps_colours():
    with open_slide(DICOM_LEVEL0) as dicom, open_slide(CMU_SVS) as svs:
        low = dicom.read_region((0, 0), 3, dicom.level_dimensions[3]).reshape(-1, 3).mean(axis=0)
        full = svs.read_region((0, 0), 0, svs.dimensions).reshape(-1, 3).mean(axis=0)
    assert np.abs(low - full).max() < 4.0


def test_svs_needs_no_colour_correction():
    with open_slide(CMU_SVS) as reader:
        assert reader.pixel_corrections == ()


def test_pyramidal_tiff_pixels_equal_svs(pyramidal_tiff):
    with open_slide(pyramidal_tiff) as reader:
        assert reader.backend == "openslide"
        assert reader.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741)]
        assert reader.mpp == pytest.approx(CMU_MPP)
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, reader.dimensions), cmu_pixels())


def test_subifd_tiff_read_by_tifffile(pyramidal_tiff_subifds_jpeg):
    with TiffReader(pyramidal_tiff_subifds_jpeg) as reader:
        assert reader.level_count == 3
        assert reader.mpp == pytest.approx(CMU_MPP)
        assert reader.mpp_source == "tiff.XResolution"
        difference = np.abs(reader.read_region((0, 0), 0, reader.dimensions).astype(int) - cmu_pixels())
    assert difference.mean() < 4.0  # JPEG quality 90


def test_ome_tiff_mpp_levels_and_pixels(ome_tiff):
    with open_slide(ome_tiff) as reader:
        assert reader.backend == "tifffile"
        assert reader.vendor == "ome"
        assert reader.mpp_source == "ome.PhysicalSizeX"
        assert reader.mpp == pytest.approx(CMU_MPP)
        assert reader.level_dimensions == [(2220, 2967), (1110, 1483), (555, 741)]
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, reader.dimensions), cmu_pixels())


def test_flat_tiff_falls_back_to_tifffile(flat_tiff, caplog):
    with caplog.at_level(logging.WARNING, logger="virchow.wsi.readers"):
        reader = open_slide(flat_tiff)
    with reader:
        assert reader.backend == "tifffile"
        assert reader.level_count == 1
        assert reader.mpp == pytest.approx(CMU_MPP)
        np.testing.assert_array_equal(reader.read_region((300, 1000), 0, (500, 300)), cmu_pixels()[1000:1300, 300:800])
    assert any("falling back to tifffile" in record.message for record in caplog.records)


def test_rgba_png_transparent_is_white(rgba_png):
    with open_slide(rgba_png) as reader:
        assert isinstance(reader, ImageReader)
        assert reader.mpp == pytest.approx(CMU_MPP, rel=1e-3)
        assert reader.mpp_source == "png.pHYs"
        pixels = reader.read_region((0, 0), 0, reader.dimensions)
    assert (pixels[:40, :40] == 255).all()
    np.testing.assert_array_equal(pixels[512, 500:524], cmu_pixels()[1512, 1200:1224])


def test_png_without_phys_has_no_mpp(blank_png):
    with open_slide(blank_png) as reader:
        assert reader.mpp is None
        assert reader.mpp_source is None


def test_low_dpi_is_ignored(tmp_path):
    path = tmp_path / "screen.png"
    Image.new("RGB", (64, 64), "white").save(path, dpi=(96, 96))
    with open_slide(path) as reader:
        assert reader.mpp is None


def test_decompression_bomb_rejected(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    Image.new("RGB", (400, 300), "white").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(SlideReadError, match="decompression-bomb"):
        open_slide(path)


@pytest.mark.parametrize("fixture_name", ["pyramidal_tiff", "ome_tiff", "flat_tiff", "rgba_png"])
def test_read_past_edge_is_white(fixture_name, request):
    with open_slide(request.getfixturevalue(fixture_name)) as reader:
        width, height = reader.dimensions
        region = reader.read_region((width - 10, height - 20), 0, (50, 60))
    assert (region[20:, :] == 255).all()
    assert (region[:, 10:] == 255).all()


def test_openslide_read_past_edge_is_white():
    with open_slide(CMU_SVS) as reader:
        region = reader.read_region((-30, -30), 0, (60, 60))
    assert (region[:30] == 255).all()
    assert (region[:, :30] == 255).all()


def test_broken_svs_raises_slide_read_error():
    with pytest.raises(SlideReadError, match="broken.svs"):
        open_slide(BROKEN_SVS)


def test_truncated_svs_raises_slide_read_error(truncated_svs):
    with pytest.raises(SlideReadError, match="truncated"):
        open_slide(truncated_svs)


def test_truncated_data_detected_by_tifffile(tmp_path, flat_tiff):
    path = tmp_path / "cut.tif"
    data = flat_tiff.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\x00" * 16)
    with pytest.raises(SlideError):
        open_slide(path)


def test_missing_file_raises_not_found(tmp_path):
    with pytest.raises(SlideNotFoundError):
        open_slide(tmp_path / "absent.svs")


def test_unsupported_extension_lists_supported(tmp_path):
    path = tmp_path / "slide.vsi"
    path.write_bytes(b"data")
    with pytest.raises(UnsupportedFormatError, match=r"\.svs"):
        open_slide(path)


def test_directory_is_rejected():
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_slide(DICOM_LEVEL0.parent)


def test_is_supported():
    assert is_supported("a/b.SVS")
    assert is_supported("x.ome.tiff")
    assert not is_supported("x.vsi")
    assert ".dcm" in SUPPORTED_EXTENSIONS


@pytest.mark.parametrize("reader_class", [OpenSlideReader, TiffReader])
def test_corrupt_tile_fails_alone(corrupt_tile_svs, reader_class):
    path, (x, y, width, height) = corrupt_tile_svs
    with reader_class(path) as reader:
        with pytest.raises(TileReadError, match=rf"\(x, y\)=\({x + 10}, {y + 10}\)"):
            reader.read_region((x + 10, y + 10), 0, (100, 100))
        neighbour = reader.read_region((x - width, y), 0, (width, height))
        np.testing.assert_array_equal(neighbour, cmu_pixels()[y : y + height, x - width : x])
        with pytest.raises(TileReadError):
            reader.read_region((x, y), 0, (width, height))


def test_open_slide_accepts_corrupt_tile_slide(corrupt_tile_svs, caplog):
    path, _ = corrupt_tile_svs
    with caplog.at_level(logging.WARNING, logger="virchow.wsi.readers"), open_slide(path) as reader:
        assert reader.backend == "openslide"
    assert any("may be damaged" in record.message for record in caplog.records)


def test_closed_reader_rejects_reads():
    reader = open_slide(CMU_SVS)
    reader.close()
    with pytest.raises(ValueError, match="closed"):
        reader.read_region((0, 0), 0, (10, 10))


def test_invalid_region_arguments():
    with open_slide(CMU_SVS) as reader:
        with pytest.raises(ValueError, match="level"):
            reader.read_region((0, 0), 1, (10, 10))
        with pytest.raises(ValueError, match="positive"):
            reader.read_region((0, 0), 0, (0, 10))


def test_level_location_round_trip():
    with open_slide(DICOM_LEVEL0) as reader:
        for level in range(reader.level_count):
            downsample = reader.level_downsamples[level]
            for level_x in (0, 1, 7, 333):
                location = (round(level_x * downsample), round(level_x * downsample))
                assert reader.level_location(location, level) == (level_x, level_x)


def test_best_level_for_downsample():
    with open_slide(NDPI) as reader:
        assert reader.get_best_level_for_downsample(1.0) == 0
        assert reader.get_best_level_for_downsample(3.9) == 1
        assert reader.get_best_level_for_downsample(4.0) == 2
        assert reader.get_best_level_for_downsample(1000) == 6


def test_repr_names_file_and_mpp():
    with open_slide(CMU_SVS) as reader:
        text = repr(reader)
    assert "CMU-1-Small-Region.svs" in text
    assert "mpp=0.499" in text


def test_read_downsampled_chunked_matches_whole(flat_tiff, monkeypatch):
    with open_slide(flat_tiff) as reader:
        whole = reader.read_downsampled(8)
        sizes: list[tuple[int, int]] = []
        original = reader.read_region

        def spy(location, level, size):
            sizes.append(size)
            return original(location, level, size)

        monkeypatch.setattr(reader, "read_region", spy)
        chunked = reader.read_downsampled(8, max_chunk_pixels=256 * 256)
    assert chunked.shape == (371, 278, 3)
    assert max(width * height for width, height in sizes) <= 256 * 256
    assert len(sizes) > 20
    assert np.abs(chunked.astype(int) - whole).max() <= 1


def test_read_downsampled_isolates_damaged_tile(corrupt_tile_svs):
    path, (x, y, width, height) = corrupt_tile_svs
    damaged: list[tuple[int, int, int, int]] = []
    with OpenSlideReader(path) as reader:
        with pytest.raises(TileReadError):
            reader.read_downsampled(16)
        image = reader.read_downsampled(16, damaged_regions=damaged)
    assert image.shape == (186, 139, 3)
    assert damaged
    for dx, dy, dw, dh in damaged:
        assert dx < x + width
        assert dx + dw > x
        assert dy < y + height
        assert dy + dh > y
    assert sum(dw * dh for _, _, dw, dh in damaged) <= 4 * 512 * 512


def test_reader_path_and_properties():
    with open_slide(Path(CMU_SVS)) as reader:
        assert reader.path == CMU_SVS
        assert reader.vendor == "aperio"
        assert reader.properties["aperio.MPP"] == "0.4990"
        assert reader.bounds == (0, 0, 2220, 2967)


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26", "aperio.MPP": "0.5"}, (0.25, 0.26, "openslide.mpp-x")),
        ({"aperio.MPP": "0.2527"}, (0.2527, 0.2527, "aperio.MPP")),
        (
            {
                "mirax.LAYER_0_LEVEL_1_SECTION.MICROMETER_PER_PIXEL_X": "0.48",
                "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.243",
                "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y": "0.244",
            },
            (0.243, 0.244, "mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X"),
        ),
        (
            {"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "centimeter"},
            (0.25, 0.25, "tiff.XResolution"),
        ),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, (0.5, 0.5, "tiff.XResolution")),
        ({"tiff.XResolution": "72", "tiff.ResolutionUnit": "none"}, (None, None, None)),
        ({"openslide.mpp-x": "not-a-number"}, (None, None, None)),
    ],
    ids=["openslide", "aperio", "mirax", "tiff-cm", "tiff-inch", "tiff-no-unit", "invalid"],
)
def test_mpp_from_openslide_properties(properties, expected):
    mpp_x, mpp_y, source = mpp_from_openslide_properties(properties)
    assert source == expected[2]
    assert mpp_x == (pytest.approx(expected[0]) if expected[0] is not None else None)
    assert mpp_y == (pytest.approx(expected[1]) if expected[1] is not None else None)


def test_composite_on_white():
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    rgb = composite_on_white(rgba)
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 1], [10, 20, 30])
    np.testing.assert_array_equal(rgb[0, 2], [127, 127, 127])


def test_openslide_bounds_from_properties():
    with OpenSlideReader(CMU_SVS) as reader:
        reader._properties.update(
            {
                "openslide.bounds-x": "300",
                "openslide.bounds-y": "400",
                "openslide.bounds-width": "5000",
                "openslide.bounds-height": "900",
            }
        )
        assert reader._read_bounds() == (300, 400, 1920, 900)


def test_concurrent_reads_survive_damaged_tile(corrupt_tile_svs):
    path, (x, y, width, height) = corrupt_tile_svs
    healthy = [
        (column * 240, row * 240) for row in range(12) for column in range(9) if (column * 240, row * 240) != (x, y)
    ]
    with OpenSlideReader(path) as reader:

        def read(location):
            try:
                return reader.read_region(location, 0, (240, 240))
            except TileReadError:
                return None

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(read, (x, y)) for _ in range(6)] + [pool.submit(read, xy) for xy in healthy]
            results = [future.result() for future in futures]
    assert all(result is None for result in results[:6])
    for (hx, hy), result in zip(healthy, results[6:], strict=True):
        np.testing.assert_array_equal(result, cmu_pixels()[hy : hy + 240, hx : hx + 240])


def _layout_cases():
    rgb = np.ascontiguousarray(cmu_pixels()[1200:1500, 900:1300])
    grey = rgb[..., 1]
    planar = np.moveaxis(rgb, -1, 0)
    rgba = np.dstack([rgb, np.where(np.arange(400) < 200, 255, 0).astype(np.uint8)[None, :].repeat(300, 0)])
    expected_rgba = rgb.copy()
    expected_rgba[:, 200:] = 255
    return [
        ("planar-strips", planar, {"photometric": "rgb", "planarconfig": "separate", "rowsperstrip": 16}, rgb),
        ("planar-tiles", planar, {"photometric": "rgb", "planarconfig": "separate", "tile": (64, 64)}, rgb),
        ("grey-uint16", grey.astype(np.uint16) * 257, {"photometric": "minisblack"}, np.dstack([grey] * 3)),
        ("miniswhite", 255 - grey, {"photometric": "miniswhite", "tile": (64, 64)}, np.dstack([grey] * 3)),
        ("rgba-unassociated", rgba, {"photometric": "rgb", "extrasamples": [2], "tile": (64, 64)}, expected_rgba),
    ]


@pytest.mark.parametrize(
    ("name", "data", "options", "expected"), _layout_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_tiff_pixel_layouts(tmp_path, name, data, options, expected):
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, data, **options)
    with TiffReader(path) as reader:
        assert reader.dimensions == (400, 300)
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, (400, 300)), expected)
        np.testing.assert_array_equal(reader.read_region((70, 30), 0, (90, 50)), expected[30:80, 70:160])


def test_tiff_with_extra_axes_rejected(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 64, 64), dtype=np.uint8), photometric="minisblack")
    with pytest.raises(UnsupportedFormatError, match="axes"):
        TiffReader(path)


def test_dicom_check_failure_is_logged(monkeypatch, caplog):
    def fail(path, slide):
        raise AttributeError("TotalPixelMatrixColumns")

    monkeypatch.setattr(openslide_reader, "detect_dicom_ycbcr_quirk", fail)
    with caplog.at_level(logging.WARNING), OpenSlideReader(DICOM_LEVEL0) as reader:
        assert reader.pixel_corrections == ()
        assert reader.properties["virchow.dicom-colour-check"] == "undetermined"
    assert any("colour check failed" in record.message for record in caplog.records)
