"""Validation metrics of a tile classifier and the improvement test of early stopping."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score
from torch.nn import functional as F


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Return ``loss`` (mean cross-entropy), ``accuracy``, ``balanced_accuracy`` and ``macro_f1``.

    Args:
        logits: (N, C) float logits.
        labels: (N,) class indices.
        num_classes: C. Macro F1 averages over all C classes, counting absent ones as 0.

    Balanced accuracy is the mean recall over the classes present in ``labels``, as scikit-learn
    computes it.
    """
    if labels.size == 0:
        return {}
    predictions = logits.argmax(axis=1)
    loss = F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)).item()
    with warnings.catch_warnings():
        # sklearn warns when predictions contain classes absent from the labels, a normal case here.
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(labels, predictions)
    macro_f1 = f1_score(labels, predictions, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {
        "loss": float(loss),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
    }


def is_improvement(value: float, best: float | None, monitor: str) -> bool:
    """Return True when ``value`` beats ``best``: lower for ``loss``, higher for the other metrics."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best
