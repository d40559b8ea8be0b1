"""Fixtures for the downstream tests: the Kather 2016 feature table, MIL bags built from it, and a CLI runner."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_limits

from tests.downstream.helpers import KATHER_TABLE, TUMOUR, write_slide_h5


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Run BLAS, OpenMP and torch single-threaded.

    The probes and aggregators here work on matrices of a few thousand entries, where extra
    threads only add synchronisation. On a shared 2-core runner the lbfgs fits ran about 50 times
    slower with two BLAS threads than with one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def kather_table() -> pd.DataFrame:
    return pd.read_csv(KATHER_TABLE)


@pytest.fixture(scope="session")
def kather_bags(tmp_path_factory, kather_table) -> dict:
    """Write MIL bags of real Kather 2016 texture features as per-slide HDF5 files plus a slide CSV.

    120 slides of 40-200 tiles; even-numbered slides are positive with 30-60 % tumour tiles,
    odd-numbered slides hold only the seven other tissue classes. Two slides per patient.
    The slide column carries a ``.h5`` suffix on purpose, which the loader must ignore.
    """
    root = tmp_path_factory.mktemp("kather_bags")
    features_dir = root / "features"
    features_dir.mkdir()
    columns = [c for c in kather_table.columns if c.startswith("f")]
    x = kather_table[columns].to_numpy(np.float32)
    tumour = np.flatnonzero(kather_table["label"] == TUMOUR)
    other = np.flatnonzero(kather_table["label"] != TUMOUR)
    rng = np.random.default_rng(0)

    rows, tumour_masks = [], {}
    for b in range(120):
        positive = b % 2 == 0
        n = int(rng.integers(40, 201))
        n_tumour = int(round(n * rng.uniform(0.3, 0.6))) if positive else 0
        idx = np.concatenate(
            [rng.choice(tumour, n_tumour, replace=False), rng.choice(other, n - n_tumour, replace=False)]
        )
        idx = idx[rng.permutation(n)]
        slide_id = f"slide_{b:03d}"
        write_slide_h5(features_dir / f"{slide_id}.h5", x[idx])
        tumour_masks[slide_id] = np.isin(idx, tumour)
        rows.append(
            {"slide_id": f"{slide_id}.h5", "label": "tumour" if positive else "normal", "patient": f"P{b // 2:03d}"}
        )

    csv = root / "slides.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return {"features": features_dir, "csv": csv, "tumour": tumour_masks}
