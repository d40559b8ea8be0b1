"""Replica processes killed with SIGKILL while they write a feature file: retry, then ``worker_died``."""

from __future__ import annotations

import csv
import os
import re
import signal
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from virchow.distributed import EmbedderSpec, RayEngineOptions
from virchow.distributed.ray_engine import WORKER_DIED, embed_slides_with_ray
from virchow.io.h5 import TMP_SUFFIX

from .conftest import copy_slides

pytestmark = pytest.mark.ray

# Temporary feature files are named .<slide_id>.h5.<host>.<pid>.tmp by the process writing them.
_TEMPORARY = re.compile(r"^\.(?P<slide>[^.]+)\.h5\..+\.(?P<pid>\d+)" + re.escape(TMP_SUFFIX) + "$")


class Killer(threading.Thread):
    """Kill every process that starts writing the feature file of a chosen slide, up to a number of times."""

    def __init__(self, features_dir: Path, kills_per_slide: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.features_dir = features_dir
        self.remaining = dict(kills_per_slide)
        self.killed: list[tuple[str, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            if not self.features_dir.is_dir():
                continue
            for path in self.features_dir.iterdir():
                match = _TEMPORARY.match(path.name)
                if match is None or self.remaining.get(match["slide"], 0) <= 0:
                    continue
                pid = int(match["pid"])
                if (match["slide"], pid) in self.killed:
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append((match["slide"], pid))
                self.remaining[match["slide"]] -= 1


def test_killed_replica_retried_then_worker_died(ray_cluster, tmp_path):
    names = ["a", "b", "c", "d"]
    slides = copy_slides(tmp_path / "slides", names)
    out = tmp_path / "out"
    spec = EmbedderSpec("virchow-test", "random:0", device="cpu", precision="fp32", batch_size=16)
    options = RayEngineOptions(max_slide_retries=1)
    # b's first attempt is killed, c's two attempts are both killed.
    killer = Killer(out / "features", {"b": 1, "c": 2})
    killer.start()
    try:
        summary = embed_slides_with_ray([slides], out, spec, options=options, progress=False)
    finally:
        killer.stop.set()
        killer.join()

    assert sorted(slide for slide, _ in killer.killed) == ["b", "c", "c"]
    outcomes = {o.slide_id: o for o in summary.outcomes}
    assert sorted(outcomes) == names  # every slide once
    for name in ("a", "b", "d"):
        assert outcomes[name].status == "done", outcomes[name]
    assert outcomes["c"].status == "failed"
    assert outcomes["c"].reason == WORKER_DIED
    assert "2 attempts" in outcomes["c"].message
    assert sum(stats.deaths for stats in summary.replicas) == 3

    with (out / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["slide_id"] for row in rows) == names
    assert {row["slide_id"]: row["reason"] for row in rows}["c"] == WORKER_DIED
    # No partial file under a final name, and no temporary file of a killed process left behind.
    assert sorted(p.name for p in (out / "features").iterdir()) == ["a.h5", "b.h5", "d.h5"]
    assert not list((out / ".locks").glob("*.lock"))
    with h5py.File(out / "features" / "a.h5") as a, h5py.File(out / "features" / "b.h5") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert np.array_equal(a["features"][:], b["features"][:])
