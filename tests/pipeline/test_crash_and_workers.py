"""Crash safety and shared output folders, with real processes."""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from .conftest import WSI

COMMAND = [sys.executable, "-m", "virchow", "embed-slides", "--model", "virchow-test", "--weights", "random:0",
           "--precision", "fp32", "--no-progress"]


def _copies(folder: Path, names: list[str]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copyfile(WSI / "CMU-1-Small-Region.svs", folder / f"{name}.svs")
    return folder


def _start(slides: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, str(slides), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path) as handle:
        return handle["coords"][:], handle["features"][:]


def test_sigkill_mid_batch_then_resume(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    slides = _copies(tmp_path / "slides", names)
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    assert subprocess.run([*COMMAND, str(slides), "--out", str(reference)], capture_output=True).returncode == 0

    process = _start(slides, out)
    deadline = time.monotonic() + 120
    while not (out / "features" / "a.h5").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()

    finished = sorted(p.stem for p in (out / "features").glob("*.h5"))
    assert finished, "no slide finished before the kill"
    assert len(finished) < len(names), finished
    for name in finished:  # whatever carries the final name is complete
        coords, features = _features(out / "features" / f"{name}.h5")
        assert len(features) == len(coords) > 0
    mtimes = {name: (out / "features" / f"{name}.h5").stat().st_mtime_ns for name in finished}

    resumed = subprocess.run([*COMMAND, str(slides), "--out", str(out)], capture_output=True, text=True)

    assert resumed.returncode == 0, resumed.stderr
    for name in finished:
        assert (out / "features" / f"{name}.h5").stat().st_mtime_ns == mtimes[name]
        assert f"{name}: already done" in resumed.stderr
    assert not list((out / "features").glob(".*"))
    assert not list((out / ".locks").glob("*.lock"))
    for name in names:
        coords, features = _features(out / "features" / f"{name}.h5")
        ref_coords, ref_features = _features(reference / "features" / f"{name}.h5")
        assert np.array_equal(coords, ref_coords)
        assert np.array_equal(features, ref_features)
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted(row["slide_id"] for row in rows) == names
    assert all(row["status"] == "done" for row in rows)


def test_two_workers_share_a_folder(tmp_path):
    names = ["a", "b", "c", "d", "e", "f"]
    slides = _copies(tmp_path / "slides", names)
    out = tmp_path / "out"

    workers = [_start(slides, out), _start(slides, out)]
    results = [worker.communicate(timeout=300) for worker in workers]

    assert [worker.returncode for worker in workers] == [0, 0], results
    embedded = [m for _, stderr in results for m in re.findall(r"INFO virchow.pipeline.slide: (\w+): \d+ tiles in", stderr)]
    assert sorted(embedded) == names  # every slide embedded exactly once across both workers
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted(row["slide_id"] for row in rows) == names
    assert {row["pid"] for row in rows} <= {str(w.pid) for w in workers}
    assert all((out / "features" / f"{name}.h5").is_file() for name in names)
