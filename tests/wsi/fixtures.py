"""Builders of test slides derived from CMU-1-Small-Region.svs.

Plain functions so that other test packages can import them; ``conftest.py`` wraps them in
session-scoped fixtures. Every builder writes into the ``dst`` path it is given and returns it.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import cv2
import numpy as np
import openslide
import tifffile
from PIL import Image

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "wsi"
CMU_SVS = SAMPLE_DIR / "CMU-1-Small-Region.svs"
TCGA_SVS = SAMPLE_DIR / "TCGA-CR-7395-01A-01-TS1.svs"
BROKEN_SVS = SAMPLE_DIR / "broken.svs"
NDPI = SAMPLE_DIR / "test3-DAPI-2-387.ndpi"
DICOM_LEVEL0 = SAMPLE_DIR / "CMU-1-Small-Region-dicom" / "level-0-frames-0-30.dcm"

#: Level-0 pixel size of CMU-1-Small-Region.svs (aperio.MPP), in um/px.
CMU_MPP = 0.499


@functools.lru_cache(maxsize=1)
def cmu_pixels() -> np.ndarray:
    """Return level 0 of CMU-1-Small-Region.svs as a read-only (2967, 2220, 3) uint8 RGB array."""
    with openslide.OpenSlide(str(CMU_SVS)) as slide:
        rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    pixels = np.ascontiguousarray(rgba[..., :3])
    pixels.setflags(write=False)
    return pixels


def _pyramid(levels: int) -> list[np.ndarray]:
    images = [cmu_pixels()]
    for _ in range(1, levels):
        previous = images[-1]
        size = (previous.shape[1] // 2, previous.shape[0] // 2)
        images.append(cv2.resize(previous, size, interpolation=cv2.INTER_AREA))
    return images


def _compression_args(compression: str) -> dict:
    if compression == "jpeg":
        return {"compression": "jpeg", "compressionargs": {"level": 90}}
    return {"compression": compression}


def make_pyramidal_tiff(
    dst: Path, *, compression: str = "zlib", subifds: bool = False, levels: int = 3, tile: int = 256
) -> Path:
    """Write CMU-1 level 0 as a tiled pyramidal TIFF with the resolution tags set to 0.499 um/px.

    Args:
        dst: output file (``.tif``).
        compression: ``"zlib"`` (lossless, pixels equal the SVS) or ``"jpeg"``.
        subifds: store the reduced levels as SubIFDs of level 0 (the OME and libvips layout) instead
            of as further pages (the layout OpenSlide's generic TIFF driver reads).
        levels: number of levels, each half the size of the previous one.
        tile: tile side in pixels.
    """
    images = _pyramid(levels)
    resolution = (1e4 / CMU_MPP, 1e4 / CMU_MPP)
    options = {"tile": (tile, tile), "photometric": "rgb", **_compression_args(compression)}
    with tifffile.TiffWriter(dst) as writer:
        writer.write(
            images[0],
            subifds=levels - 1 if subifds else None,
            resolution=resolution,
            resolutionunit="CENTIMETER",
            **options,
        )
        for image in images[1:]:
            writer.write(image, subfiletype=1, **options)
    return dst


def make_ome_tiff(dst: Path, *, compression: str = "zlib", levels: int = 3) -> Path:
    """Write CMU-1 level 0 as a tiled OME-TIFF pyramid (SubIFDs) with PhysicalSizeX/Y = 0.499 um."""
    images = _pyramid(levels)
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": CMU_MPP,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": CMU_MPP,
        "PhysicalSizeYUnit": "µm",
    }
    options = {"tile": (256, 256), "photometric": "rgb", **_compression_args(compression)}
    with tifffile.TiffWriter(dst, ome=True) as writer:
        writer.write(images[0], subifds=levels - 1, metadata=metadata, **options)
        for image in images[1:]:
            writer.write(image, subfiletype=1, metadata=None, **options)
    return dst


def make_flat_tiff(dst: Path, *, rows_per_strip: int = 64) -> Path:
    """Write CMU-1 level 0 as a single-level striped (untiled) TIFF at 0.499 um/px in inch units."""
    dpi = 25400.0 / CMU_MPP
    tifffile.imwrite(
        dst,
        cmu_pixels(),
        photometric="rgb",
        rowsperstrip=rows_per_strip,
        compression="zlib",
        resolution=(dpi, dpi),
        resolutionunit="INCH",
    )
    return dst


def make_rgba_png(dst: Path, *, size: int = 1024) -> Path:
    """Write a CMU-1 crop whose pixels outside a centred disk are transparent black (0, 0, 0, 0).

    The PNG pHYs chunk gives 0.499 um/px.
    """
    crop = cmu_pixels()[1000 : 1000 + size, 700 : 700 + size]
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.4) ** 2
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[inside, :3] = crop[inside]
    rgba[inside, 3] = 255
    dpi = 25400.0 / CMU_MPP
    Image.fromarray(rgba, "RGBA").save(dst, dpi=(dpi, dpi))
    return dst


def make_blank_png(dst: Path, *, size: tuple[int, int] = (1200, 900), noise: int = 3, seed: int = 0) -> Path:
    """Write an empty-glass image: near-white (245) RGB with +-``noise`` uniform noise and no pHYs chunk."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = 245 + rng.integers(-noise, noise + 1, size=(height, width, 3))
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(dst)
    return dst


def make_truncated_svs(dst: Path, *, fraction: float = 0.5) -> Path:
    """Write the first ``fraction`` of the bytes of CMU-1-Small-Region.svs."""
    data = CMU_SVS.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def make_corrupt_tile_svs(dst: Path, *, column: int = 4, row: int = 6) -> tuple[Path, tuple[int, int, int, int]]:
    """Copy CMU-1-Small-Region.svs and overwrite the bytes of one level-0 tile with zeros.

    The tile's bytes are found through the TIFF TileOffsets and TileByteCounts of level 0.

    Returns:
        (path, rect): the file and the level-0 (x, y, width, height) of the damaged tile.
    """
    shutil.copyfile(CMU_SVS, dst)
    dst.chmod(0o644)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        columns = -(-page.imagewidth // page.tilewidth)
        index = row * columns + column
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        tile_w, tile_h = page.tilewidth, page.tilelength
    with dst.open("r+b") as handle:
        handle.seek(offset)
        handle.write(b"\x00" * count)
    return dst, (column * tile_w, row * tile_h, tile_w, tile_h)
