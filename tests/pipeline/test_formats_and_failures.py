"""Fixture slides built from the sample, and slides that must fail without stopping the batch."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest

from virchow.cli.main import main
from virchow.pipeline import SlideInput, SlideJobConfig, embed_slides
from virchow.wsi.readers import open_slide

from ..wsi import fixtures
from .conftest import WSI


def _run(inputs, out, embedder, **settings):
    return embed_slides(inputs, out, embedder, SlideJobConfig(**settings), progress=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: fixtures.make_pyramidal_tiff(d / "pyramid.tif"),
        lambda d: fixtures.make_ome_tiff(d / "pyramid.ome.tif"),
        lambda d: fixtures.make_flat_tiff(d / "flat.tif"),
    ],
    ids=["pyramidal-tiff", "ome-tiff", "flat-tiff"],
)
def test_tiff_fixtures_equal_the_svs(tmp_path, pixel_embedder, make):
    path = make(tmp_path)
    svs = WSI / "CMU-1-Small-Region.svs"
    summary = _run([SlideInput(svs, "svs"), SlideInput(path, "fixture")], tmp_path / "out", pixel_embedder)

    assert summary.ok
    with h5py.File(tmp_path / "out/features/svs.h5") as a, h5py.File(tmp_path / "out/features/fixture.h5") as b:
        assert b.attrs["mpp_slide"] == pytest.approx(0.499, abs=1e-4)
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert np.array_equal(a["features"][:5], b["features"][:5])  # lossless fixtures: identical pixels


def test_rgba_png_transparent_background_is_white(tmp_path, pixel_embedder):
    path = fixtures.make_rgba_png(tmp_path / "rgba.png")
    summary = _run([path], tmp_path / "out", pixel_embedder, tissue="none", min_tissue=0.0)

    assert summary.ok
    with h5py.File(tmp_path / "out/features/rgba.h5") as handle:
        corner = handle["features"][0].reshape(224, 224, 3)  # the top-left tile lies outside the disk
        assert (corner[:20, :20] == 255).all()


def test_corrupt_tile_is_excluded_and_recorded(tmp_path, pixel_embedder):
    path, (x, y, width, height) = fixtures.make_corrupt_tile_svs(tmp_path / "corrupt.svs")
    _run([WSI / "CMU-1-Small-Region.svs"], tmp_path / "clean", pixel_embedder, tissue="none", min_tissue=0.0)
    summary = _run([path], tmp_path / "out", pixel_embedder, tissue="none", min_tissue=0.0)

    assert summary.ok
    outcome = summary.outcomes[0]
    assert outcome.reason == "tiles_excluded"
    assert outcome.failed_tiles > 0
    with h5py.File(tmp_path / "out/features/corrupt.h5") as handle:
        failed = handle["failed_coords"][:]
        coords = handle["coords"][:]
        assert len(failed) == outcome.failed_tiles
        for fx, fy in failed:  # every excluded tile overlaps the damaged TIFF tile
            assert fx < x + width
            assert fx + 224 > x
            assert fy < y + height
            assert fy + 224 > y
        assert not {tuple(c) for c in failed} & {tuple(c) for c in coords}
        features = handle["features"][:]
        # No blank replacement: every stored tile equals the clean slide's tile at the same place.
        with h5py.File(tmp_path / "clean/features/CMU-1-Small-Region.h5") as reference:
            index = {tuple(c): i for i, c in enumerate(reference["coords"][:])}
            for row, xy in enumerate(coords[:10]):
                assert np.array_equal(features[row], reference["features"][index[tuple(xy)]])
        assert len(coords) + len(failed) == len(index)


def test_batch_with_broken_and_truncated_slides(tmp_path, caplog):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copyfile(WSI / "CMU-1-Small-Region.svs", slides / "good.svs")
    shutil.copyfile(WSI / "broken.svs", slides / "broken.svs")
    fixtures.make_truncated_svs(slides / "truncated.svs")
    (slides / "notes.vsi").write_bytes(b"olympus")
    out = tmp_path / "out"

    status = main(["embed-slides", str(slides), "--out", str(out), "--model", "virchow-test", "--weights", "random:0",
                   "--no-progress"])

    assert status == 1
    rows = {row["slide_id"]: row for row in csv.DictReader((out / "manifest.csv").open())}
    assert rows["good"]["status"] == "done"
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["reason"] in {"unreadable", "unsupported_format"}
    assert rows["truncated"]["status"] == "failed"
    assert rows["truncated"]["message"]
    assert rows["notes.vsi"]["status"] == "skipped"
    assert rows["notes.vsi"]["reason"] == "unsupported_format"
    assert (out / "features" / "good.h5").is_file()
    assert not (out / "features" / "broken.h5").exists()
    assert not list((out / "features").glob(".*"))
    assert "broken" in caplog.text


def test_open_slide_reports_broken_file():
    from virchow.errors import SlideError

    with pytest.raises(SlideError):
        open_slide(WSI / "broken.svs")


def test_rerun_skips_done_and_redoes_changed_settings(tmp_path, test_embedder):
    slide = WSI / "CMU-1-Small-Region.svs"
    out = tmp_path / "out"
    _run([slide], out, test_embedder)
    output = out / "features" / "CMU-1-Small-Region.h5"
    first_mtime = output.stat().st_mtime_ns

    again = _run([slide], out, test_embedder)
    assert again.outcomes[0].reason == "already_done"
    assert output.stat().st_mtime_ns == first_mtime

    changed = _run([slide], out, test_embedder, min_tissue=0.5)
    assert changed.outcomes[0].status == "done"
    assert output.stat().st_mtime_ns != first_mtime
    with h5py.File(output) as handle:
        assert handle.attrs["min_tissue"] == 0.5
