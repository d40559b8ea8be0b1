"""Fold construction: grouping by patient, leakage checks, split columns."""

from __future__ import annotations

import numpy as np
import pytest

from virchow.downstream.splits import (
    Fold,
    add_validation_folds,
    check_fold_classes,
    check_group_leakage,
    kfold_splits,
    split_from_column,
)
from virchow.errors import DataError


def _patients(n_patients: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    slides_per_patient = rng.integers(1, 5, n_patients)
    groups = np.repeat([f"P{i}" for i in range(n_patients)], slides_per_patient)
    labels = np.repeat(rng.integers(0, 2, n_patients), slides_per_patient)
    return labels, groups


def test_grouped_kfold_keeps_patients_together():
    y, groups = _patients()
    folds = kfold_splits(y, groups, n_splits=5, seed=0)

    fold_of_patient: dict[str, set[int]] = {}
    for fold in folds:
        for patient in groups[fold.test]:
            fold_of_patient.setdefault(patient, set()).add(fold.index)
        assert not set(groups[fold.train]) & set(groups[fold.test])
    assert all(len(f) == 1 for f in fold_of_patient.values())
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == list(range(len(y)))


def test_validation_folds_disjoint():
    y, groups = _patients()
    folds = add_validation_folds(kfold_splits(y, groups, n_splits=4, seed=1))
    for fold in folds:
        parts = [set(groups[idx]) for idx in (fold.train, fold.val, fold.test)]
        assert not parts[0] & parts[1]
        assert not parts[0] & parts[2]
        assert not parts[1] & parts[2]
        assert fold.train.size + fold.val.size + fold.test.size == len(y)
    check_group_leakage(folds, groups)


def test_leakage_detected():
    groups = np.array(["A", "A", "B", "C"])
    leaky = [Fold(0, np.array([0, 2]), np.array([1, 3]), np.empty(0, int))]
    with pytest.raises(DataError, match="group leakage in fold 0.*'A'"):
        check_group_leakage(leaky, groups)


def test_too_few_patients_for_folds():
    with pytest.raises(DataError, match="5 folds need at least 5 groups"):
        kfold_splits(np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "c"]), n_splits=5, seed=0)


def test_split_column_values():
    fold = split_from_column(["train", "Train", "validation", "test", " val "])
    assert fold.train.tolist() == [0, 1]
    assert fold.val.tolist() == [2, 4]
    assert fold.test.tolist() == [3]
    with pytest.raises(DataError, match="invalid values \\['holdout'\\]"):
        split_from_column(["train", "holdout"])
    with pytest.raises(DataError, match="no 'val' rows"):
        split_from_column(["train", "test"], require_val=True)


def test_single_class_fold_rejected():
    fold = Fold(0, np.array([0, 1]), np.array([2, 3]), np.empty(0, int))
    with pytest.raises(DataError, match="fold 0: the test split has only class 1 for 'label'"):
        check_fold_classes([fold], np.array([0, 1, 1, 1]), task="label")
    empty = Fold(0, np.array([0, 1]), np.array([2]), np.empty(0, int))
    with pytest.raises(DataError, match="test split has no labelled samples"):
        check_fold_classes([empty], np.array([0, 1, -100]), task="label", ignore_value=-100)
