"""Tile-level probes on the real Kather 2016 texture features and on small embedding files."""

from __future__ import annotations

import json
import logging

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.downstream.helpers import KATHER_TABLE, run_command
from virchow.cli import probe as probe_command
from virchow.downstream.metrics import BootstrapConfig
from virchow.downstream.probe import ProbeConfig, run_probe
from virchow.downstream.tile_inputs import LabelledFeatures, load_embeddings_with_labels, load_feature_table
from virchow.errors import DataError


@pytest.fixture(scope="module")
def kather_probe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_kather")
    # A four-value C grid keeps the inner CV short; C=10 won every fold with the default 7-value grid.
    options = "--feature-prefix f --label-col label --folds 5 --c-grid 0.01 0.1 1 10 --bootstrap 200"
    argv = ["--table", str(KATHER_TABLE), *options.split(), "--out", str(out)]
    assert run_command(probe_command, argv) == 0
    return out


def test_kather_linear_probe_accuracy(kather_probe_run):
    report = json.loads((kather_probe_run / "report.json").read_text())
    pooled = report["methods"]["linear"]["pooled"]["balanced_accuracy"]
    assert pooled["value"] >= 0.83
    assert pooled["ci_low"] <= pooled["value"] <= pooled["ci_high"]
    assert pooled["n_resamples"] == 200
    assert len(report["methods"]["linear"]["folds"]) == 5
    assert report["n_samples"] == 5000
    assert len(report["classes"]) == 8


def test_kather_report_has_both_probes_with_intervals(kather_probe_run):
    report = json.loads((kather_probe_run / "report.json").read_text())
    for method in ("linear", "knn"):
        pooled = report["methods"][method]["pooled"]
        for metric in ("balanced_accuracy", "f1_weighted", "auroc"):
            assert pooled[metric]["ci_low"] is not None, (method, metric)
            assert pooled[metric]["ci_high"] >= pooled[metric]["ci_low"], (method, metric)
        for fold in report["methods"][method]["folds"]:
            assert fold["metrics"]["auroc"]["ci_low"] is not None
        assert np.array(report["methods"][method]["confusion_matrix"]).sum() == 5000
    assert report["methods"]["knn"]["pooled"]["balanced_accuracy"]["value"] > 1 / 8 + 0.2
    assert "200 resamples" in report["metric_notes"]["confidence_interval"]


def test_kather_report_files(kather_probe_run):
    markdown = (kather_probe_run / "report.md").read_text()
    assert "Linear probe" in markdown
    assert "kNN probe (cosine, k=20, uniform votes)" in markdown
    assert "95% percentile bootstrap, 200 resamples" in markdown
    for method in ("linear", "knn"):
        with Image.open(kather_probe_run / f"confusion_{method}.png") as image:
            assert image.format == "PNG"
        predictions = pd.read_csv(kather_probe_run / f"predictions_{method}.csv")
        assert len(predictions) == 5000
        assert predictions["id"].nunique() == 5000


def test_label_column_leak_rejected():
    with pytest.raises(DataError, match="'label_idx' encodes the label"):
        load_feature_table(KATHER_TABLE, label_col="label")
    data = load_feature_table(KATHER_TABLE, label_col="label", exclude_cols=["label_idx"])
    assert data.features.shape == (5000, 43)


def _embedding_files(tmp_path, n_patients=12, tiles_per_patient=5, seed=0):
    rng = np.random.default_rng(seed)
    rows, features, paths = [], [], []
    for p in range(n_patients):
        label = "tumour" if p % 2 else "normal"
        for t in range(tiles_per_patient):
            path = f"{label}/patient{p}_tile{t}.png"
            paths.append(path)
            features.append(rng.normal(1.5 if p % 2 else -1.5, 1.0, size=8))
            rows.append({"path": f"./{path}", "label": label, "patient": f"P{p}"})
    rows.append({"path": "normal/never_embedded.png", "label": "normal", "patient": "P99"})
    paths.append("tumour/unlabelled.png")
    features.append(rng.normal(size=8))

    h5_path = tmp_path / "tiles.h5"
    with h5py.File(h5_path, "w") as handle:
        handle.create_dataset("features", data=np.array(features, dtype=np.float32))
        handle.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        handle.attrs["model"] = "virchow-test"
        handle.attrs["weights_random"] = True
    csv_path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return h5_path, csv_path


def test_embeddings_join_reports_unmatched(tmp_path, caplog):
    h5_path, csv_path = _embedding_files(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = load_embeddings_with_labels(h5_path, csv_path, group_col="patient")
    assert data.features.shape == (60, 8)
    assert "normal/never_embedded.png" in caplog.text
    assert "tumour/unlabelled.png" in caplog.text
    assert data.source["attributes"]["model"] == "virchow-test"


def test_embeddings_without_any_match(tmp_path):
    h5_path, _ = _embedding_files(tmp_path)
    csv_path = tmp_path / "other.csv"
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", "y"]}).to_csv(csv_path, index=False)
    with pytest.raises(DataError, match="no path in .* matches an embedded path.*a.png"):
        load_embeddings_with_labels(h5_path, csv_path)


def test_grouped_probe_has_no_patient_leak(tmp_path):
    h5_path, csv_path = _embedding_files(tmp_path)
    data = load_embeddings_with_labels(h5_path, csv_path, group_col="patient")
    config = ProbeConfig(n_folds=3, k=5, bootstrap=BootstrapConfig(n_resamples=50))
    result = run_probe(data, config)

    fold_of_patient: dict[str, set[str]] = {}
    for evaluation in result.methods["linear"].folds:
        for patient in data.groups[evaluation.indices]:
            fold_of_patient.setdefault(patient, set()).add(evaluation.name)
    assert len(fold_of_patient) == 12
    assert all(len(folds) == 1 for folds in fold_of_patient.values())
    assert result.methods["linear"].pooled.metrics["balanced_accuracy"].value > 0.9


def test_split_column_scores_val_and_test():
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b"], 30)
    data = LabelledFeatures(
        features=(rng.normal(size=(60, 4)) + (y == "b")[:, None] * 2).astype(np.float32),
        labels=y,
        ids=np.array([str(i) for i in range(60)], dtype=object),
        splits=np.tile(np.array(["train", "train", "train", "val", "test"]), 12),
    )
    result = run_probe(data, ProbeConfig(methods=("linear",), bootstrap=BootstrapConfig(n_resamples=20)))
    names = [e.name for e in result.methods["linear"].folds]
    assert names == ["test", "val"]
    assert result.methods["linear"].pooled is None
    assert result.split_mode == "split_column"
