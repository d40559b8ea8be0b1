"""Classification metrics with percentile bootstrap confidence intervals.

A bootstrap resample is represented by how often each sample was drawn (a row of counts), so every
metric is a weighted statistic over the original samples and all resamples of a chunk are scored
with a few array operations. With all counts equal to one the weighted statistics equal the
scikit-learn functions they mirror (``balanced_accuracy_score``, ``f1_score(average="weighted")``,
``roc_auc_score``, ``average_precision_score``). The tests check this.

AUROC and AUPRC are binary for two classes (the score of the second class) and the unweighted mean
of the one-vs-rest values otherwise. Classes without positives or negatives in a resample are
left out of that mean, and resamples where a metric is undefined are dropped from its interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

METRIC_NAMES = ("balanced_accuracy", "f1_weighted", "auroc", "auprc")

# Upper bound on resamples x samples held in one count matrix (int64), about 64 MiB.
_MAX_CHUNK_CELLS = 8_000_000


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of the percentile bootstrap.

    Attributes:
        n_resamples: number of resamples drawn with replacement, or 0 to skip the intervals.
        confidence: two-sided coverage of the interval, 0.95 for the 2.5th and 97.5th percentiles.
        seed: seed of the resampling generator, so intervals are reproducible.
    """

    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class MetricCI:
    """A metric value with its bootstrap interval.

    Attributes:
        value: the metric on the full sample, NaN when undefined (for example AUROC with one class).
        ci_low: lower percentile bound, NaN without valid resamples.
        ci_high: upper percentile bound, NaN without valid resamples.
        n_resamples: resamples on which the metric was defined and that entered the interval.
    """

    value: float
    ci_low: float
    ci_high: float
    n_resamples: int

    def to_dict(self) -> dict[str, float | int | None]:
        """Return a JSON-safe dict, with None in place of NaN."""
        return {
            "value": _json_float(self.value),
            "ci_low": _json_float(self.ci_low),
            "ci_high": _json_float(self.ci_high),
            "n_resamples": self.n_resamples,
        }

    def format(self, digits: int = 3) -> str:
        """Format as ``value [low, high]`` for reports."""
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.ci_low):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def compute_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    names: Sequence[str] = METRIC_NAMES,
    bootstrap: BootstrapConfig | None = None,
) -> dict[str, MetricCI]:
    """Compute classification metrics and their percentile bootstrap intervals.

    Args:
        y_true: (N,) integer class indices in ``[0, K)``.
        proba: (N, K) class probabilities or scores. The prediction is their argmax.
        names: metrics to compute, a subset of ``METRIC_NAMES``.
        bootstrap: resampling settings, ``BootstrapConfig()`` when None.

    Returns:
        One ``MetricCI`` per requested name, in the order given.

    Raises:
        ValueError: on unknown metric names or inconsistent shapes.
    """
    bootstrap = bootstrap or BootstrapConfig()
    unknown = sorted(set(names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric names {unknown}. Valid names are {list(METRIC_NAMES)}")
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"proba must have shape (N, K) with N={y_true.shape[0]}, got {proba.shape}")
    n_classes = proba.shape[1]
    if y_true.size and (y_true.min() < 0 or y_true.max() >= n_classes):
        raise ValueError(f"class indices must lie in [0, {n_classes}), got {y_true.min()}..{y_true.max()}")

    full = _score_counts(np.ones((1, y_true.size), dtype=np.int64), y_true, proba, names)
    resampled: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for counts in _bootstrap_counts(y_true.size, bootstrap):
        for name, values in _score_counts(counts, y_true, proba, names).items():
            resampled[name].append(values)

    alpha = 1.0 - bootstrap.confidence
    results: dict[str, MetricCI] = {}
    for name in names:
        values = np.concatenate(resampled[name]) if resampled[name] else np.empty(0)
        values = values[np.isfinite(values)]
        if values.size:
            low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        else:
            low = high = math.nan
        results[name] = MetricCI(float(full[name][0]), float(low), float(high), int(values.size))
    return results


def _bootstrap_counts(n_samples: int, config: BootstrapConfig) -> Iterator[np.ndarray]:
    """Yield (chunk, n_samples) matrices of draw counts, config.n_resamples rows in total."""
    if config.n_resamples <= 0 or n_samples == 0:
        return
    rng = np.random.default_rng(config.seed)
    chunk = max(1, min(config.n_resamples, _MAX_CHUNK_CELLS // n_samples))
    remaining = config.n_resamples
    while remaining > 0:
        rows = min(chunk, remaining)
        draws = rng.integers(0, n_samples, size=(rows, n_samples))
        offsets = (np.arange(rows) * n_samples)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=rows * n_samples).reshape(rows, n_samples)
        yield counts
        remaining -= rows


def _score_counts(
    counts: np.ndarray, y_true: np.ndarray, proba: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Score every row of ``counts`` (one resample each) with the named metrics."""
    n_classes = proba.shape[1]
    weights = counts.astype(np.float64)
    out: dict[str, np.ndarray] = {}

    if {"balanced_accuracy", "f1_weighted"} & set(names):
        y_pred = proba.argmax(axis=1)
        confusion = weighted_confusion(weights, y_true, y_pred, n_classes)
        if "balanced_accuracy" in names:
            out["balanced_accuracy"] = balanced_accuracy_from_confusion(confusion)
        if "f1_weighted" in names:
            out["f1_weighted"] = weighted_f1_from_confusion(confusion)

    for name, binary_metric in (("auroc", weighted_auroc), ("auprc", weighted_average_precision)):
        if name not in names:
            continue
        if n_classes == 2:
            out[name] = binary_metric(weights, y_true == 1, proba[:, 1])
            continue
        per_class = np.stack([binary_metric(weights, y_true == k, proba[:, k]) for k in range(n_classes)], axis=1)
        defined = np.isfinite(per_class)
        sums = np.where(defined, per_class, 0.0).sum(axis=1)
        n_defined = defined.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(n_defined > 0, sums / np.maximum(n_defined, 1), np.nan)
    return out


def weighted_confusion(weights: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Return (B, K, K) confusion matrices (rows true, columns predicted) for B weight rows."""
    cells = y_true * n_classes + y_pred
    order = np.argsort(cells, kind="stable")
    sorted_cells = cells[order]
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]]) if cells.size else np.empty(0, int)
    confusion = np.zeros((weights.shape[0], n_classes * n_classes))
    if cells.size:
        confusion[:, sorted_cells[starts]] = np.add.reduceat(weights[:, order], starts, axis=1)
    return confusion.reshape(-1, n_classes, n_classes)


def balanced_accuracy_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in each (B, K, K) confusion matrix."""
    support = confusion.sum(axis=2)
    correct = np.diagonal(confusion, axis1=1, axis2=2)
    present = support > 0
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=present)
    n_present = present.sum(axis=1)
    return np.where(n_present > 0, recall.sum(axis=1) / np.maximum(n_present, 1), np.nan)


def weighted_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Support-weighted mean of per-class F1 (0 where precision and recall are both 0)."""
    support = confusion.sum(axis=2)
    predicted = confusion.sum(axis=1)
    correct = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = support + predicted
    f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
    total = support.sum(axis=1)
    return np.where(total > 0, (f1 * support).sum(axis=1) / np.maximum(total, 1e-300), np.nan)


def _tie_groups(score: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return the sort order of ``score`` and the start index of each run of equal scores."""
    order = np.argsort(-score if descending else score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    return order, starts


def weighted_auroc(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC per weight row, ties counting one half. NaN without both classes."""
    if score.size == 0:
        return np.full(weights.shape[0], np.nan)
    order, starts = _tie_groups(score, descending=False)
    w = weights[:, order]
    pos = positive[order]
    pos_per_group = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    neg_per_group = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    neg_below = np.cumsum(neg_per_group, axis=1) - neg_per_group
    n_pos = pos_per_group.sum(axis=1)
    n_neg = neg_per_group.sum(axis=1)
    pairs = n_pos * n_neg
    wins = (pos_per_group * (neg_below + 0.5 * neg_per_group)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full_like(wins, np.nan), where=pairs > 0)


def weighted_average_precision(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted average precision per weight row (step-wise, as scikit-learn). NaN without positives."""
    if score.size == 0:
        return np.full(weights.shape[0], np.nan)
    order, starts = _tie_groups(score, descending=True)
    w = weights[:, order]
    pos = positive[order]
    tp_per_group = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    fp_per_group = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
    tp = np.cumsum(tp_per_group, axis=1)
    fp = np.cumsum(fp_per_group, axis=1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    n_pos = tp[:, -1]
    ap = (tp_per_group * precision).sum(axis=1)
    return np.divide(ap, n_pos, out=np.full_like(ap, np.nan), where=n_pos > 0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the (K, K) integer confusion matrix, rows true and columns predicted."""
    ones = np.ones((1, len(y_true)))
    return weighted_confusion(ones, np.asarray(y_true), np.asarray(y_pred), n_classes)[0].astype(np.int64)
