"""embed-slides on the real sample slides: exact pixels, resolution, colour and metadata."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import openslide
import pytest

from virchow.pipeline import SlideInput, SlideJobConfig, embed_slides
from virchow.wsi.readers import open_slide
from virchow.wsi.resolution import plan_resolution
from virchow.wsi.tiling import read_tile

from .conftest import WSI


def _run(inputs, out, embedder, **settings):
    return embed_slides(inputs, out, embedder, SlideJobConfig(**settings), progress=False)


def test_sample_slide_embedded_pixels_equal_slide(tmp_path, pixel_embedder):
    slide = WSI / "CMU-1-Small-Region.svs"
    summary = _run([slide], tmp_path, pixel_embedder)

    assert summary.ok
    with h5py.File(tmp_path / "features" / "CMU-1-Small-Region.h5") as handle:
        coords = handle["coords"][:]
        features = handle["features"]
        assert len(coords) > 20
        assert coords.dtype == np.int64
        rng = np.random.default_rng(0)
        with openslide.OpenSlide(str(slide)) as reference, open_slide(slide) as reader:
            plan = plan_resolution(reader, 0.5, 224)
            for i in rng.choice(len(coords), size=5, replace=False):
                embedded = features[i].reshape(224, 224, 3).astype(np.uint8)
                x, y = (int(v) for v in coords[i])
                # Level 0 is 0.499 um/px, within the 1% level tolerance: tiles are read 1:1.
                direct = np.asarray(reference.read_region((x, y), 0, (224, 224)).convert("RGB"))
                assert np.array_equal(embedded, direct)
                assert np.array_equal(embedded, read_tile(reader, plan, (x, y)))


def test_sample_slide_outputs_and_attributes(tmp_path, test_embedder):
    summary = _run([WSI / "CMU-1-Small-Region.svs"], tmp_path, test_embedder)

    assert summary.ok
    with h5py.File(tmp_path / "features" / "CMU-1-Small-Region.h5") as handle:
        assert handle["features"].shape == (len(handle["coords"]), 320)
        assert handle["features"].dtype == np.float32
        assert handle["failed_coords"].shape == (0, 2)
        attrs = handle.attrs
        for key in ("model", "weights_source", "weights_sha256", "weights_random", "embedding_kind", "precision",
                    "mpp_target", "mpp_slide", "level", "tile_size", "patch_size_level0", "level0_width",
                    "level0_height", "tissue_method", "tissue_params", "virchow_version", "created", "scale",
                    "mpp_effective"):
            assert key in attrs, key
        assert attrs["level0_width"] == 2220
        assert attrs["mpp_slide"] == pytest.approx(0.499)
        assert handle["coords"].attrs["patch_size_level0"] == pytest.approx(224.0)
        # Tiles never cross the slide edge by default.
        coords = handle["coords"][:]
        assert (coords[:, 0] + 224 <= 2220).all()
        assert (coords[:, 1] + 224 <= 2967).all()

    geojson = json.loads((tmp_path / "qc" / "CMU-1-Small-Region.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"
    assert geojson["features"]
    assert (tmp_path / "qc" / "CMU-1-Small-Region.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open()))
    assert rows[0]["status"] == "done"
    assert int(rows[0]["tiles"]) == summary.tiles


def test_float16_storage(tmp_path, test_embedder):
    _run([WSI / "CMU-1-Small-Region.svs"], tmp_path, test_embedder, float16=True)
    with h5py.File(tmp_path / "features" / "CMU-1-Small-Region.h5") as handle:
        assert handle["features"].dtype == np.float16


def test_missing_mpp_fails_then_override_succeeds(tmp_path, pixel_embedder):
    slide = WSI / "TCGA-CR-7395-01A-01-TS1.svs"
    first = _run([slide], tmp_path / "default", pixel_embedder)
    assert not first.ok
    assert first.failed[0].reason == "no_mpp"
    assert "--assume-mpp" in first.failed[0].message
    assert "manifest" in first.failed[0].message

    assumed = _run([slide], tmp_path / "assumed", pixel_embedder, assume_mpp=0.25)
    assert assumed.ok
    with h5py.File(tmp_path / "assumed" / "features" / "TCGA-CR-7395-01A-01-TS1.h5") as handle:
        assert handle.attrs["mpp_slide"] == pytest.approx(0.25)
        assert "assume" in handle.attrs["mpp_source"]
        assert abs(handle.attrs["mpp_effective"] / 0.5 - 1) < 0.01
        assert "level" in handle.attrs
        assert len(handle["coords"]) > 0

    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,mpp,slide_id\n{slide},0.25,tcga\n")
    from_csv = _run([manifest], tmp_path / "csv", pixel_embedder)
    assert from_csv.ok
    assert (tmp_path / "csv" / "features" / "tcga.h5").is_file()


def test_ndpi_effective_mpp_and_level(tmp_path, pixel_embedder):
    # Fluorescence with a dark background: take the whole slide instead of H&E tissue detection.
    summary = _run([WSI / "test3-DAPI-2-387.ndpi"], tmp_path, pixel_embedder, tissue="none")
    assert summary.ok
    with h5py.File(tmp_path / "features" / "test3-DAPI-2-387.h5") as handle:
        attrs = handle.attrs
        assert attrs["mpp_slide"] == pytest.approx(0.2282, abs=1e-3)
        assert abs(attrs["mpp_effective"] / 0.5 - 1) < 0.01
        assert attrs["level"] == 1  # 0.456 um/px is the finest level not coarser than 0.5
        assert attrs["scale"] < 1
        assert len(handle["coords"]) > 0


def test_dicom_colour_matches_svs(tmp_path, pixel_embedder):
    dicom = WSI / "CMU-1-Small-Region-dicom" / "level-0-frames-0-30.dcm"
    svs = WSI / "CMU-1-Small-Region.svs"
    inputs = [SlideInput(svs, "svs"), SlideInput(dicom, "dicom")]
    assert _run(inputs, tmp_path, pixel_embedder).ok

    with h5py.File(tmp_path / "features" / "svs.h5") as a, h5py.File(tmp_path / "features" / "dicom.h5") as b:
        common = {tuple(c) for c in a["coords"][:]} & {tuple(c) for c in b["coords"][:]}
        assert len(common) > 10
        index_a = {tuple(c): i for i, c in enumerate(a["coords"][:])}
        index_b = {tuple(c): i for i, c in enumerate(b["coords"][:])}
        for xy in sorted(common)[:5]:
            mean_a = a["features"][index_a[xy]].reshape(-1, 3).mean(0)
            mean_b = b["features"][index_b[xy]].reshape(-1, 3).mean(0)
            assert np.abs(mean_a - mean_b).max() < 4.0, (xy, mean_a, mean_b)
