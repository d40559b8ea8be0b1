"""The Ray engine on a real two-node local cluster: same outputs as the local engine, failures, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from virchow.cli.main import main
from virchow.distributed import EmbedderSpec
from virchow.distributed.ray_engine import embed_slides_with_ray
from virchow.embed import Embedder
from virchow.models import load_model
from virchow.pipeline import SlideInput, SlideJobConfig, embed_slides
from virchow.pipeline.locks import SlideLock
from virchow.pipeline.manifest import COLUMNS

from .conftest import SAMPLE, TEST_MODEL, copy_slides

pytestmark = pytest.mark.ray

NAMES = ["a", "b", "c"]
# Attributes that legitimately differ between two runs or two slides.
VARYING_ATTRS = {"created", "slide_id", "slide_path", "seconds_plan", "seconds_embed", "seconds_read_wait", "seconds_total"}


@pytest.fixture(scope="module")
def ray_job(ray_cluster, tmp_path_factory) -> tuple[Path, Path, int]:
    """Run ``embed-slides --engine ray`` through the CLI on three sample copies and a broken slide."""
    work = tmp_path_factory.mktemp("ray_job")
    slides = copy_slides(work / "slides", NAMES, broken=True)
    out = work / "out"
    status = main(["embed-slides", str(slides), "--out", str(out), *TEST_MODEL, "--no-progress",
                   "--engine", "ray", "--ray-address", ray_cluster.address])
    return slides, out, status


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory) -> Path:
    """The local engine's feature file of the sample slide, with the same test model."""
    out = tmp_path_factory.mktemp("local")
    embedder = Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="fp32", batch_size=16)
    summary = embed_slides([SlideInput(SAMPLE, "a")], out, embedder, SlideJobConfig(), progress=False)
    assert summary.ok
    return out / "features" / "a.h5"


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "manifest.csv").open() as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_ray_features_equal_local_engine(ray_job, local_reference):
    _, out, _ = ray_job
    with h5py.File(local_reference) as reference:
        ref_coords = reference["coords"][:]
        ref_features = reference["features"][:]
        ref_attrs = dict(reference.attrs)
        ref_datasets = set(reference)
        for name in NAMES:
            with h5py.File(out / "features" / f"{name}.h5") as handle:
                assert set(handle) == ref_datasets, name
                assert np.array_equal(handle["coords"][:], ref_coords), name
                assert handle["features"].dtype == ref_features.dtype
                np.testing.assert_allclose(handle["features"][:], ref_features, rtol=0, atol=1e-6, err_msg=name)
                assert set(handle.attrs) == set(ref_attrs), name
                for key, value in ref_attrs.items():
                    if key not in VARYING_ATTRS:
                        assert np.array_equal(handle.attrs[key], value), (name, key)
                assert dict(handle["coords"].attrs) == dict(reference["coords"].attrs)


def test_ray_broken_slide_failed_others_done(ray_job):
    _, out, status = ray_job
    rows = _rows(out)

    assert status == 1
    assert sorted(rows) == sorted([*NAMES, "broken"])
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["reason"] in {"unreadable", "unsupported_format"}
    assert "broken.svs" in rows["broken"]["message"]
    assert not (out / "features" / "broken.h5").exists()
    for name in NAMES:
        assert rows[name]["status"] == "done", rows[name]
        assert rows[name]["reason"] == "ok"
        assert int(rows[name]["tiles"]) > 0
        assert (out / "qc" / f"{name}.png").is_file()
        assert (out / "qc" / f"{name}.geojson").is_file()
    assert not list((out / "features").glob(".*"))
    assert not list((out / ".locks").glob("*.lock"))


def test_ray_manifest_has_local_columns(ray_job):
    _, out, _ = ray_job
    with (out / "manifest.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header == COLUMNS


def test_ray_rerun_skips_done_and_respects_locks(ray_job, ray_cluster):
    slides, out, _ = ray_job
    mtimes = {name: (out / "features" / f"{name}.h5").stat().st_mtime_ns for name in NAMES}
    spec = EmbedderSpec("virchow-test", "random:0", device="cpu", precision="fp32", batch_size=16)
    # A live process on this host (the test itself) has locked the broken slide, as a second job would.
    lock = SlideLock.acquire(out / ".locks" / "broken.lock")
    assert lock is not None
    try:
        summary = embed_slides_with_ray([slides], out, spec, progress=False)
    finally:
        lock.release()

    assert summary.busy == ["broken"]
    assert sorted(o.slide_id for o in summary.outcomes) == NAMES
    assert all(o.reason == "already_done" for o in summary.outcomes)
    assert summary.tiles == 0
    for name in NAMES:
        assert (out / "features" / f"{name}.h5").stat().st_mtime_ns == mtimes[name]
    assert _rows(out)["broken"]["status"] == "failed"  # left as the first run recorded it


def test_ray_cli_connects_and_disconnects(ray_cluster, tmp_path):
    import ray

    slides = copy_slides(tmp_path / "slides", ["a"])
    out = tmp_path / "out"
    # Without a connection in this process the engine connects to --ray-address for the job only.
    ray.shutdown()
    try:
        status = main(["embed-slides", str(slides), "--out", str(out), *TEST_MODEL, "--no-progress",
                       "--engine", "ray", "--ray-address", ray_cluster.address])
        connected_after_job = ray.is_initialized()
    finally:
        ray.init(address=ray_cluster.address)

    assert status == 0
    assert not connected_after_job
    assert _rows(out)["a"]["status"] == "done"
