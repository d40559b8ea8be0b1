"""Linear and k-nearest-neighbour probes on frozen tile features.

The linear probe is scikit-learn's ``LogisticRegression`` (L2, lbfgs, multinomial) on
standardised features, with the inverse regularisation strength C chosen per outer fold by an
inner stratified (and grouped) cross-validation on balanced accuracy. The kNN probe votes among the
k nearest training tiles by cosine distance. Both are scored out of fold, per fold and pooled.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from virchow.downstream.metrics import BootstrapConfig, MetricCI, compute_metrics, confusion_matrix
from virchow.downstream.splits import Fold, check_group_leakage, kfold_splits, split_from_column
from virchow.downstream.tile_inputs import LabelledFeatures
from virchow.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

PROBE_METRICS = ("balanced_accuracy", "f1_weighted", "auroc")
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of a probe run.

    Attributes:
        methods: probes to run, ``linear`` and/or ``knn``.
        n_folds: outer folds when no split column is given.
        seed: seed of fold assignment, inner CV and bootstrap.
        c_grid: candidate C values of the logistic regression.
        inner_folds: inner CV folds for choosing C (reduced when a class has fewer training samples).
        max_iter: lbfgs iteration limit.
        k: neighbours of the kNN probe (capped by the training size).
        knn_weights: ``uniform`` votes or ``distance`` (inverse cosine distance) weighted votes.
        scaler: ``standard`` fits a StandardScaler on each training split, and ``none`` uses raw features.
        bootstrap: confidence-interval settings.
        n_jobs: parallel jobs of the inner grid search.
    """

    methods: tuple[str, ...] = ("linear", "knn")
    n_folds: int = 5
    seed: int = 0
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    inner_folds: int = 3
    max_iter: int = 1000
    k: int = 20
    knn_weights: Literal["uniform", "distance"] = "uniform"
    scaler: Literal["standard", "none"] = "standard"
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    n_jobs: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - {"linear", "knn"})
        if unknown or not self.methods:
            raise ConfigError(f"invalid probe methods {list(self.methods)}. Choose from ['linear', 'knn']")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.knn_weights not in ("uniform", "distance"):
            raise ConfigError(f"knn_weights must be 'uniform' or 'distance', got {self.knn_weights!r}")
        if self.scaler not in ("standard", "none"):
            raise ConfigError(f"scaler must be 'standard' or 'none', got {self.scaler!r}")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ConfigError(f"the C grid must hold positive values, got {list(self.c_grid)}")


@dataclass
class EvaluationResult:
    """Predictions and metrics of one method on one held-out split."""

    name: str
    indices: np.ndarray
    proba: np.ndarray
    metrics: dict[str, MetricCI]
    params: dict = field(default_factory=dict)


@dataclass
class MethodResult:
    """Per-fold and pooled results of one probe method."""

    method: str
    folds: list[EvaluationResult]
    pooled: EvaluationResult | None
    confusion: np.ndarray


@dataclass
class ProbeResult:
    """Everything the report needs."""

    classes: list[str]
    class_counts: dict[str, int]
    n_samples: int
    n_features: int
    split_mode: str
    grouped: bool
    config: ProbeConfig
    methods: dict[str, MethodResult]
    y: np.ndarray
    ids: np.ndarray
    source: dict

    def config_dict(self) -> dict:
        """Return the configuration as a JSON-able dict."""
        config = asdict(self.config)
        config["methods"] = list(self.config.methods)
        config["c_grid"] = list(self.config.c_grid)
        return config


def run_probe(data: LabelledFeatures, config: ProbeConfig) -> ProbeResult:
    """Fit and score the configured probes out of fold.

    With ``data.splits`` the probes train on ``train`` and are scored on ``val`` and ``test``
    separately (C is still chosen by inner CV on ``train``). Otherwise stratified k-fold runs,
    grouped by ``data.groups`` when given, and out-of-fold predictions are pooled.

    Raises:
        DataError: on fewer than two classes, group leakage, or a training split with one class.
    """
    classes = sorted(set(data.labels.tolist()))
    if len(classes) < 2:
        raise DataError(f"the probe needs at least two classes, found {classes}")
    y = np.searchsorted(np.array(classes), data.labels)

    folds, split_mode = _make_folds(data, y, config)
    results = {}
    for method in config.methods:
        results[method] = _run_method(method, data, y, folds, len(classes), config, pooled=split_mode == "kfold")

    counts = {c: int((data.labels == c).sum()) for c in classes}
    return ProbeResult(
        classes=classes,
        class_counts=counts,
        n_samples=len(y),
        n_features=data.features.shape[1],
        split_mode=split_mode,
        grouped=data.groups is not None,
        config=config,
        methods=results,
        y=y,
        ids=data.ids,
        source=data.source,
    )


def _make_folds(data: LabelledFeatures, y: np.ndarray, config: ProbeConfig) -> tuple[list[Fold], str]:
    if data.splits is not None:
        fold = split_from_column(data.splits)
        if data.groups is not None:
            check_group_leakage([fold], data.groups)
        _logger.info("split column: %d train, %d val, %d test tiles", fold.train.size, fold.val.size, fold.test.size)
        return [fold], "split_column"

    folds = kfold_splits(y, data.groups, config.n_folds, config.seed)
    grouped = "grouped by patient" if data.groups is not None else "ungrouped"
    _logger.info("stratified %d-fold cross-validation, %s", config.n_folds, grouped)
    return folds, "kfold"


def _run_method(
    method: str,
    data: LabelledFeatures,
    y: np.ndarray,
    folds: list[Fold],
    n_classes: int,
    config: ProbeConfig,
    pooled: bool,
) -> MethodResult:
    evaluations: list[EvaluationResult] = []
    oof_proba = np.full((len(y), n_classes), np.nan)

    for fold in folds:
        train = fold.train
        if np.unique(y[train]).size < 2:
            raise DataError(f"fold {fold.index}: the training split has a single class. Use fewer folds")
        groups = data.groups[train] if data.groups is not None else None
        model, params = _fit(method, data.features[train], y[train], groups, n_classes, config)

        for part_name, idx in (("test", fold.test), ("val", fold.val)):
            if idx.size == 0:
                continue
            proba = _predict_proba(model, data.features[idx], n_classes)
            name = f"fold {fold.index}" if pooled else part_name
            metrics = compute_metrics(y[idx], proba, names=PROBE_METRICS, bootstrap=config.bootstrap)
            evaluations.append(EvaluationResult(name, idx, proba, metrics, params))
            if part_name == "test":
                oof_proba[idx] = proba
            _logger.info("%s probe, %s: %s", method, name, _summary(metrics))

    pooled_result = None
    if pooled:
        idx = np.arange(len(y))
        metrics = compute_metrics(y, oof_proba, names=PROBE_METRICS, bootstrap=config.bootstrap)
        pooled_result = EvaluationResult("pooled", idx, oof_proba, metrics)
        _logger.info("%s probe, pooled out of fold: %s", method, _summary(metrics))
        confusion_source = (y, oof_proba)
    else:
        test = next((e for e in evaluations if e.name == "test"), evaluations[0])
        confusion_source = (y[test.indices], test.proba)
    confusion = confusion_matrix(confusion_source[0], confusion_source[1].argmax(axis=1), n_classes)
    return MethodResult(method, evaluations, pooled_result, confusion)


def _summary(metrics: dict[str, MetricCI]) -> str:
    return ", ".join(f"{name} {value.format()}" for name, value in metrics.items())


def _fit(
    method: str, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, n_classes: int, config: ProbeConfig
) -> tuple[Pipeline, dict]:
    steps = [StandardScaler()] if config.scaler == "standard" else []
    if method == "knn":
        k = min(config.k, len(y))
        if k < config.k:
            _logger.warning("k=%d exceeds the %d training tiles. Using k=%d", config.k, len(y), k)
        knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=config.knn_weights)
        return make_pipeline(*steps, knn).fit(x, y), {"k": k, "weights": config.knn_weights}

    pipeline = make_pipeline(*steps, LogisticRegression(max_iter=config.max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        c_value, inner = _choose_c(pipeline, x, y, groups, config)
        pipeline.set_params(logisticregression__C=c_value).fit(x, y)
    n_unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    if n_unconverged:
        _logger.warning("lbfgs did not converge in %d of the fits (max_iter=%d)", n_unconverged, config.max_iter)
    return pipeline, {"C": c_value, "inner_folds": inner}


def _choose_c(
    pipeline: Pipeline, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, config: ProbeConfig
) -> tuple[float, int]:
    """Pick C by inner CV, or take the middle of the grid when a class has too few samples."""
    _, counts = np.unique(y, return_counts=True)
    units = counts
    if groups is not None:
        units = np.array([len(np.unique(groups[y == label])) for label in np.unique(y)])
    n_inner = min(config.inner_folds, int(units.min()))
    if len(config.c_grid) == 1 or n_inner < 2:
        c_value = float(config.c_grid[len(config.c_grid) // 2])
        if len(config.c_grid) > 1:
            _logger.warning(
                "a class has fewer than 2 training samples or groups, so C=%g is used without inner CV", c_value
            )
        return c_value, 0
    if n_inner < config.inner_folds:
        _logger.warning(
            "inner CV reduced to %d folds because a class has only %d samples or groups", n_inner, units.min()
        )

    if groups is not None:
        inner_cv = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=config.seed)
    else:
        inner_cv = StratifiedKFold(n_splits=n_inner, shuffle=True, random_state=config.seed)
    search = GridSearchCV(
        pipeline,
        {"logisticregression__C": list(config.c_grid)},
        cv=inner_cv,
        scoring="balanced_accuracy",
        n_jobs=config.n_jobs,
        refit=False,
    )
    search.fit(x, y, groups=groups)
    return float(search.best_params_["logisticregression__C"]), n_inner


def _predict_proba(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Return (N, n_classes) probabilities, with zeros for classes absent from the training split."""
    proba = model.predict_proba(x)
    full = np.zeros((x.shape[0], n_classes))
    full[:, model.classes_] = proba
    return full
