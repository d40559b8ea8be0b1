"""Patient-grouped cross-validation of an aggregator over several seeds.

Folds come from the split column (train/val/test) or from ``StratifiedGroupKFold`` on the first
label, grouped by patient. In k-fold mode fold k is the test fold and fold k+1 (mod k) the
validation fold for early stopping, so no test bag influences model selection. Every fold is
checked for group leakage and for parts that are empty or hold a single class before training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from virchow.downstream.metrics import BootstrapConfig, MetricCI, compute_metrics
from virchow.downstream.mil.bags import IGNORE_INDEX, BagStore, BagTable
from virchow.downstream.mil.model import MILCheckpoint, MILModelConfig
from virchow.downstream.mil.train import TrainConfig, fit_model, predict_proba
from virchow.downstream.splits import (
    Fold,
    add_validation_folds,
    check_fold_classes,
    check_group_leakage,
    kfold_splits,
    split_from_column,
)
from virchow.errors import ConfigError

_logger = logging.getLogger(__name__)

MIL_METRICS = ("auroc", "auprc", "balanced_accuracy")


@dataclass(frozen=True)
class CVConfig:
    """Cross-validation settings.

    Attributes:
        n_folds: folds without a split column (at least 3: test, validation and training).
        fold_seed: seed of the fold assignment, fixed across training seeds.
        seeds: training seeds. Every fold is trained once per seed.
        bootstrap: confidence-interval settings.
    """

    n_folds: int = 5
    fold_seed: int = 0
    seeds: tuple[int, ...] = (0,)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("at least one training seed is needed")


@dataclass
class FoldRecord:
    """Outcome of one (seed, fold) fit.

    Attributes:
        metrics: split name -> label column -> metric name -> value with interval.
    """

    seed: int
    fold: int
    sizes: dict[str, int]
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    checkpoint: Path
    metrics: dict[str, dict[str, dict[str, MetricCI]]]


@dataclass
class CVResult:
    """All fits of a cross-validation run.

    Attributes:
        split_mode: ``kfold`` or ``split_column``.
        folds: one record per (seed, fold).
        pooled: seed -> label column -> metric -> value over the pooled test predictions.
        predictions: one row per (seed, fold, split, bag) with true classes and probabilities.
    """

    split_mode: str
    folds: list[FoldRecord]
    pooled: dict[int, dict[str, dict[str, MetricCI]]]
    predictions: pd.DataFrame

    def seed_summary(self) -> dict[str, dict[str, dict[str, float | list[float]]]]:
        """Return label -> metric -> mean, std (ddof 1, or 0 for a single seed) and values of the pooled metric over seeds."""
        summary: dict = {}
        for per_label in self.pooled.values():
            for label, metrics in per_label.items():
                for name, value in metrics.items():
                    summary.setdefault(label, {}).setdefault(name, []).append(value.value)
        out: dict = {}
        for label, metrics in summary.items():
            out[label] = {}
            for name, values in metrics.items():
                arr = np.array(values, dtype=float)
                std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
                out[label][name] = {"mean": float(np.mean(arr)), "std": std, "values": [float(v) for v in arr]}
        return out


def make_mil_folds(table: BagTable, n_folds: int, fold_seed: int) -> tuple[list[Fold], str]:
    """Build train/val/test folds for the bags and check them.

    Raises:
        DataError: on group leakage, or a split that is empty or has a single class for a label.
    """
    groups = table.groups()
    if any(bag.split is not None for bag in table.bags):
        folds = [split_from_column([bag.split for bag in table.bags], require_val=True)]
        mode = "split_column"
    else:
        # Bags without the first label form their own stratum, so they spread over the folds.
        folds = add_validation_folds(kfold_splits(table.labels(0), groups, n_folds, fold_seed))
        mode = "kfold"

    check_group_leakage(folds, groups)
    for task, column in enumerate(table.label_cols):
        check_fold_classes(folds, table.labels(task), task=column, ignore_value=IGNORE_INDEX)
    for fold in folds:
        sizes = ", ".join(f"{name} {idx.size}" for name, idx in fold.parts().items())
        _logger.info("fold %d: %s bags", fold.index, sizes)
    return folds, mode


def run_cross_validation(
    table: BagTable,
    store: BagStore,
    model_config: MILModelConfig,
    train_config: TrainConfig,
    cv_config: CVConfig,
    checkpoint_dir: Path,
    data_settings: dict,
) -> CVResult:
    """Train and score one aggregator per (seed, fold) and write a checkpoint for each.

    Args:
        table: labelled bags.
        store: feature loader.
        model_config: architecture.
        train_config: optimisation settings.
        cv_config: folds, seeds and bootstrap settings.
        checkpoint_dir: folder of ``seed{S}_fold{K}.pt`` files.
        data_settings: table columns and bag settings stored in every checkpoint for prediction.
    """
    folds, mode = make_mil_folds(table, cv_config.n_folds, cv_config.fold_seed)
    device = torch.device(train_config.device)
    records: list[FoldRecord] = []
    frames: list[pd.DataFrame] = []

    for seed in cv_config.seeds:
        for fold in folds:
            tag = f"seed {seed} fold {fold.index}"
            parts = {name: [table.bags[i] for i in idx] for name, idx in fold.parts().items()}
            fit = fit_model(model_config, train_config, store, parts["train"], parts["val"], seed=seed, tag=tag)

            checkpoint_path = checkpoint_dir / f"seed{seed}_fold{fold.index}.pt"
            settings = {
                "train": train_config.to_dict(),
                "data": data_settings,
                "seed": seed,
                "fold": fold.index,
                "best_epoch": fit.best_epoch,
                "class_weights": fit.class_weights,
                "split_mode": mode,
            }
            MILCheckpoint(
                model=model_config,
                state_dict=fit.state_dict,
                label_cols=table.label_cols,
                classes=table.classes,
                standardizer=fit.standardizer,
                settings=settings,
                bags={name: [b.bag_id for b in bags] for name, bags in parts.items()},
            ).save(checkpoint_path)

            # score the held-out parts with the best-epoch weights, read back from the checkpoint file
            model = MILCheckpoint.load(checkpoint_path).build(device)
            metrics = {}
            for name in ("val", "test") if mode == "split_column" else ("test",):
                if name not in parts:
                    continue
                idx = fold.parts()[name]
                proba = predict_proba(model, store, parts[name], fit.standardizer, device, train_config.batch_size)
                frames.append(_prediction_frame(table, idx, proba, seed, fold.index, name))
                metrics[name] = _label_metrics(table, idx, proba, cv_config.bootstrap)
                _logger.info("%s, %s: %s", tag, name, _summary(metrics[name]))

            records.append(
                FoldRecord(
                    seed,
                    fold.index,
                    {name: len(bags) for name, bags in parts.items()},
                    fit.best_epoch,
                    fit.best_val_loss,
                    len(fit.history),
                    checkpoint_path,
                    metrics,
                )
            )

    predictions = pd.concat(frames, ignore_index=True)
    pooled = {seed: _pooled_metrics(table, predictions, seed, mode, cv_config.bootstrap) for seed in cv_config.seeds}
    for seed, metrics in pooled.items():
        _logger.info("seed %d, pooled: %s", seed, _summary(metrics))
    return CVResult(mode, records, pooled, predictions)


def _label_metrics(
    table: BagTable, idx: np.ndarray, proba: list[np.ndarray], bootstrap: BootstrapConfig
) -> dict[str, dict[str, MetricCI]]:
    out = {}
    for task, column in enumerate(table.label_cols):
        y = table.labels(task)[idx]
        labelled = y != IGNORE_INDEX
        out[column] = compute_metrics(y[labelled], proba[task][labelled], names=MIL_METRICS, bootstrap=bootstrap)
    return out


def _prediction_frame(
    table: BagTable, idx: np.ndarray, proba: list[np.ndarray], seed: int, fold: int, split: str
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "seed": seed,
            "fold": fold,
            "split": split,
            "bag_id": [table.bags[i].bag_id for i in idx],
            "group": [table.bags[i].group for i in idx],
            "row": idx,
        }
    )
    for task, column in enumerate(table.label_cols):
        y = table.labels(task)[idx]
        frame[f"{column}_true"] = [table.classes[task][v] if v != IGNORE_INDEX else "" for v in y]
        for k, name in enumerate(table.classes[task]):
            frame[f"{column}_proba_{name}"] = proba[task][:, k]
    return frame


def _pooled_metrics(
    table: BagTable, predictions: pd.DataFrame, seed: int, mode: str, bootstrap: BootstrapConfig
) -> dict[str, dict[str, MetricCI]]:
    """Metrics over all test predictions of one seed (the validation split when there is no test)."""
    rows = predictions[predictions["seed"] == seed]
    split = "test" if (rows["split"] == "test").any() else "val"
    rows = rows[rows["split"] == split]
    idx = rows["row"].to_numpy()
    proba = []
    for task, column in enumerate(table.label_cols):
        proba.append(rows[[f"{column}_proba_{name}" for name in table.classes[task]]].to_numpy())
    return _label_metrics(table, idx, proba, bootstrap)


def _summary(metrics: dict[str, dict[str, MetricCI]]) -> str:
    return "; ".join(
        f"{label} " + ", ".join(f"{name} {value.format()}" for name, value in values.items())
        for label, values in metrics.items()
    )
