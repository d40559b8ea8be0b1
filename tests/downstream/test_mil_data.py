"""Slide tables and feature files: matching by name, bags, and the checks that run before training."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from tests.downstream.helpers import run_command, write_slide_h5
from virchow.cli import main as cli_main
from virchow.cli import train_mil as train_command
from virchow.downstream.mil.bags import IGNORE_INDEX, BagStore, find_feature_files, load_bag_table
from virchow.downstream.mil.cross_validation import make_mil_folds
from virchow.errors import DataError, EmptyBagError


def _slides(tmp_path, ids, n_tiles=5, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = tmp_path / "features"
    folder.mkdir(exist_ok=True)
    for slide_id in ids:
        write_slide_h5(folder / f"{slide_id}.h5", rng.normal(size=(n_tiles, dim)))
    return folder


def _table(tmp_path, rows, name="slides.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_unmatched_slides_reported_by_name(tmp_path, caplog):
    features = _slides(tmp_path, ["S1", "S2", "S3", "extra_slide"])
    csv = _table(
        tmp_path,
        [
            {"slide_id": "S1.h5", "label": "a"},
            {"slide_id": "S2", "label": "b"},
            {"slide_id": " S3.h5 ", "label": "a"},
            {"slide_id": "missing_slide", "label": "b"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        table = load_bag_table(features, csv, label_cols=["label"])
    assert [b.bag_id for b in table.bags] == ["S1", "S2", "S3"]
    assert table.missing_features == ["missing_slide"]
    assert table.unlisted_files == ["extra_slide"]
    assert "missing_slide" in caplog.text
    assert "extra_slide" in caplog.text


def test_no_match_fails_early_with_names(tmp_path):
    features = _slides(tmp_path, ["TCGA-01", "TCGA-02"])
    csv = _table(tmp_path, [{"slide_id": "case_1.svs", "label": "a"}, {"slide_id": "case_2.svs", "label": "b"}])
    with pytest.raises(
        DataError,
        match="no slide in .* Table ids such as case_1.svs, case_2.svs .* file names such as TCGA-01, TCGA-02",
    ):
        load_bag_table(features, csv, label_cols=["label"])


def test_cli_reports_unmatched_ids(tmp_path, caplog):
    features = _slides(tmp_path, ["A1", "A2"])
    csv = _table(tmp_path, [{"slide_id": "B1", "label": "x"}, {"slide_id": "B2", "label": "y"}])
    with caplog.at_level(logging.ERROR):
        status = cli_main.main(
            ["train-mil", "--features", str(features), "--slides", str(csv), "--out", str(tmp_path / "out")]
        )
    assert status == 1
    assert "B1, B2" in caplog.text
    assert "A1, A2" in caplog.text


def test_specimen_bags_concatenate_slides(tmp_path):
    features = _slides(tmp_path, ["s1", "s2", "s3"], n_tiles=4)
    csv = _table(
        tmp_path,
        [
            {"slide_id": "s1", "specimen": "SP1", "label": "pos"},
            {"slide_id": "s2", "specimen": "SP1", "label": "pos"},
            {"slide_id": "s3", "specimen": "SP2", "label": "neg"},
        ],
    )
    table = load_bag_table(features, csv, label_cols=["label"], specimen_col="specimen", bag_by="specimen")
    assert [(b.bag_id, b.slide_ids) for b in table.bags] == [("SP1", ("s1", "s2")), ("SP2", ("s3",))]
    assert table.classes == [["neg", "pos"]]
    assert BagStore().features(table.bags[0]).shape == (8, 4)


def test_conflicting_labels_in_bag(tmp_path):
    features = _slides(tmp_path, ["s1", "s2"])
    csv = _table(
        tmp_path,
        [
            {"slide_id": "s1", "specimen": "SP1", "label": "pos"},
            {"slide_id": "s2", "specimen": "SP1", "label": "neg"},
        ],
    )
    with pytest.raises(DataError, match="bag 'SP1' has slides with different labels"):
        load_bag_table(features, csv, label_cols=["label"], specimen_col="specimen", bag_by="specimen")


def test_missing_label_is_ignored(tmp_path):
    features = _slides(tmp_path, ["s1", "s2"])
    csv = _table(
        tmp_path, [{"slide_id": "s1", "label": "pos", "grade": None}, {"slide_id": "s2", "label": "neg", "grade": "2"}]
    )
    table = load_bag_table(features, csv, label_cols=["label", "grade"])
    assert table.labels(1).tolist() == [IGNORE_INDEX, 0]
    assert table.classes == [["neg", "pos"], ["2"]]


def test_empty_bag_names_the_slide(tmp_path):
    features = _slides(tmp_path, ["full"])
    write_slide_h5(features / "empty_slide.h5", np.zeros((0, 4)))
    csv = _table(tmp_path, [{"slide_id": "full", "label": "a"}, {"slide_id": "empty_slide", "label": "b"}])
    with pytest.raises(EmptyBagError, match="empty_slide"):
        load_bag_table(features, csv, label_cols=["label"])


def test_feature_dimension_mismatch(tmp_path):
    features = _slides(tmp_path, ["s1"], dim=4)
    write_slide_h5(features / "s2.h5", np.zeros((3, 8)))
    csv = _table(tmp_path, [{"slide_id": "s1", "label": "a"}, {"slide_id": "s2", "label": "b"}])
    with pytest.raises(DataError, match="differ in feature dimension"):
        load_bag_table(features, csv, label_cols=["label"])


def test_embed_slides_output_folder_accepted(tmp_path):
    _slides(tmp_path, ["s1"])
    assert list(find_feature_files(tmp_path)) == ["s1"]


def test_patients_never_cross_folds(tmp_path):
    patients = [f"P{i}" for i in range(15) for _ in range(i % 3 + 1)]
    ids = [f"slide{i}" for i in range(len(patients))]
    features = _slides(tmp_path, ids)
    labels = ["pos" if int(p[1:]) % 2 else "neg" for p in patients]
    csv = _table(tmp_path, {"slide_id": ids, "patient": patients, "label": labels})
    table = load_bag_table(features, csv, label_cols=["label"], patient_col="patient")
    folds, mode = make_mil_folds(table, n_folds=5, fold_seed=0)

    assert mode == "kfold"
    groups = table.groups()
    test_fold_of: dict[str, set[int]] = {}
    for fold in folds:
        for patient in groups[fold.test]:
            test_fold_of.setdefault(patient, set()).add(fold.index)
        assert not set(groups[fold.train]) & (set(groups[fold.val]) | set(groups[fold.test]))
        assert not set(groups[fold.val]) & set(groups[fold.test])
    assert len(test_fold_of) == 15
    assert all(len(f) == 1 for f in test_fold_of.values())


def test_single_class_fold_stops_training(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    features = _slides(tmp_path, ids)
    csv = _table(tmp_path, {"slide_id": ids, "label": ["pos", "neg", "neg", "neg", "neg", "neg"]})
    with pytest.raises(DataError, match="has only class"):
        run_command(
            train_command,
            ["--features", str(features), "--slides", str(csv), "--folds", "3", "--out", str(tmp_path / "out")],
        )
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_split_column_needs_validation(tmp_path):
    ids = [f"s{i}" for i in range(4)]
    features = _slides(tmp_path, ids)
    csv = _table(
        tmp_path, {"slide_id": ids, "label": ["a", "b", "a", "b"], "split": ["train", "train", "test", "test"]}
    )
    table = load_bag_table(features, csv, label_cols=["label"], split_col="split")
    with pytest.raises(DataError, match="no 'val' rows"):
        make_mil_folds(table, n_folds=5, fold_seed=0)
