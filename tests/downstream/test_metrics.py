"""Bootstrap metrics against scikit-learn, and their intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from virchow.downstream.metrics import BootstrapConfig, compute_metrics, confusion_matrix


def _sample(n_classes: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    proba = rng.random((n, n_classes))
    proba[np.arange(n), y] += 0.6
    proba = np.round(proba, 1)  # ties exercise the tie handling
    return y, proba / proba.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3, 8])
def test_metrics_match_sklearn(n_classes):
    y, proba = _sample(n_classes)
    pred = proba.argmax(axis=1)
    metrics = compute_metrics(y, proba, bootstrap=BootstrapConfig(n_resamples=0))

    if n_classes == 2:
        auroc, auprc = roc_auc_score(y, proba[:, 1]), average_precision_score(y, proba[:, 1])
    else:
        auroc = roc_auc_score(y, proba, multi_class="ovr", average="macro")
        auprc = np.mean([average_precision_score(y == k, proba[:, k]) for k in range(n_classes)])
    assert metrics["balanced_accuracy"].value == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics["f1_weighted"].value == pytest.approx(f1_score(y, pred, average="weighted"))
    assert metrics["auroc"].value == pytest.approx(auroc)
    assert metrics["auprc"].value == pytest.approx(auprc)


def test_intervals_bracket_value_and_repeat():
    y, proba = _sample(3)
    config = BootstrapConfig(n_resamples=300, seed=7)
    first = compute_metrics(y, proba, bootstrap=config)
    second = compute_metrics(y, proba, bootstrap=config)
    for name, value in first.items():
        assert value.ci_low <= value.value <= value.ci_high, name
        assert value.n_resamples == 300
        assert value.to_dict() == second[name].to_dict()


def test_interval_width_shrinks_with_more_samples():
    small = compute_metrics(*_sample(2, n=60), names=["auroc"], bootstrap=BootstrapConfig(300))["auroc"]
    large = compute_metrics(*_sample(2, n=3000), names=["auroc"], bootstrap=BootstrapConfig(300))["auroc"]
    assert large.ci_high - large.ci_low < small.ci_high - small.ci_low


def test_single_class_auroc_is_undefined():
    y = np.zeros(20, dtype=int)
    proba = np.tile([0.7, 0.3], (20, 1))
    metrics = compute_metrics(y, proba, bootstrap=BootstrapConfig(50))
    assert math.isnan(metrics["auroc"].value)
    assert metrics["auroc"].to_dict()["value"] is None
    assert metrics["balanced_accuracy"].value == 1.0


def test_unknown_metric_rejected():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(np.array([0, 1]), np.eye(2), names=["accuracy"])


def test_confusion_matrix_counts():
    matrix = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
