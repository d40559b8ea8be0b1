"""Session-scoped fixtures for the slide-reading tests: sample paths and slides built from CMU-1."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import fixtures


@pytest.fixture(scope="session")
def wsi_build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wsi_fixtures")


@pytest.fixture(scope="session")
def pyramidal_tiff(wsi_build_dir: Path) -> Path:
    """Tiled, zlib-compressed, 3-level TIFF with levels as pages (OpenSlide generic TIFF layout)."""
    return fixtures.make_pyramidal_tiff(wsi_build_dir / "pyramid.tif")


@pytest.fixture(scope="session")
def pyramidal_tiff_subifds_jpeg(wsi_build_dir: Path) -> Path:
    """Tiled, JPEG-compressed, 3-level TIFF with the reduced levels in SubIFDs."""
    return fixtures.make_pyramidal_tiff(wsi_build_dir / "pyramid-subifds.tif", compression="jpeg", subifds=True)


@pytest.fixture(scope="session")
def ome_tiff(wsi_build_dir: Path) -> Path:
    return fixtures.make_ome_tiff(wsi_build_dir / "pyramid.ome.tif")


@pytest.fixture(scope="session")
def flat_tiff(wsi_build_dir: Path) -> Path:
    return fixtures.make_flat_tiff(wsi_build_dir / "flat.tif")


@pytest.fixture(scope="session")
def rgba_png(wsi_build_dir: Path) -> Path:
    return fixtures.make_rgba_png(wsi_build_dir / "rgba.png")


@pytest.fixture(scope="session")
def blank_png(wsi_build_dir: Path) -> Path:
    return fixtures.make_blank_png(wsi_build_dir / "blank.png")


@pytest.fixture(scope="session")
def truncated_svs(wsi_build_dir: Path) -> Path:
    return fixtures.make_truncated_svs(wsi_build_dir / "truncated.svs")


@pytest.fixture(scope="session")
def corrupt_tile_svs(wsi_build_dir: Path) -> tuple[Path, tuple[int, int, int, int]]:
    """(path, level-0 (x, y, width, height) of the damaged tile)."""
    return fixtures.make_corrupt_tile_svs(wsi_build_dir / "corrupt-tile.svs")
