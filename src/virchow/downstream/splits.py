"""Train/validation/test splits that keep every patient (group) inside one fold.

Folds come from a split column (``train``/``val``/``test``) or from stratified k-fold, grouped by
patient with scikit-learn's ``StratifiedGroupKFold`` when a group column exists. Every split is
checked for group leakage before use, and a leak raises ``DataError`` instead of producing
optimistic metrics.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from virchow.errors import DataError

_logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """Sample indices of one split.

    Attributes:
        index: fold number, 0-based.
        train: indices used to fit the model.
        test: held-out indices the metrics are computed on.
        val: indices for model selection (early stopping), empty when the caller does not use one.
    """

    index: int
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray

    def parts(self) -> dict[str, np.ndarray]:
        """Return the non-empty parts by name."""
        parts = {"train": self.train, "val": self.val, "test": self.test}
        return {name: idx for name, idx in parts.items() if idx.size}


def kfold_splits(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int) -> list[Fold]:
    """Split samples into stratified folds, grouped so that no group spans two folds.

    Args:
        y: (N,) class labels used for stratification.
        groups: (N,) group ids (patients), or None to treat every sample as its own group.
        n_splits: number of folds, at least 2.
        seed: seed of the fold shuffling.

    Returns:
        ``n_splits`` folds with ``test`` set and ``val`` empty. The test folds partition the samples.

    Raises:
        DataError: if there are fewer groups or samples than folds, or the folds leak groups.
    """
    y = np.asarray(y)
    if n_splits < 2:
        raise DataError(f"the number of folds must be at least 2, got {n_splits}")
    n_units = len(np.unique(groups)) if groups is not None else len(y)
    unit_name = "groups (patients)" if groups is not None else "samples"
    if n_units < n_splits:
        raise DataError(f"{n_splits} folds need at least {n_splits} {unit_name}, found {n_units}. Use fewer folds")
    _warn_small_classes(y, groups, n_splits)

    if groups is None:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        raw = splitter.split(np.zeros(len(y)), y)
    else:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        raw = splitter.split(np.zeros(len(y)), y, groups)
    empty = np.empty(0, dtype=np.int64)
    with warnings.catch_warnings():
        # _warn_small_classes has already logged this case with the class name.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = [Fold(i, np.sort(train), np.sort(test), empty) for i, (train, test) in enumerate(raw)]

    if groups is not None:
        check_group_leakage(folds, groups)
    return folds


def _warn_small_classes(y: np.ndarray, groups: np.ndarray | None, n_splits: int) -> None:
    for label in np.unique(y):
        members = y == label
        n_units = len(np.unique(groups[members])) if groups is not None else int(members.sum())
        if n_units < n_splits:
            _logger.warning(
                "class %r has %d %s, fewer than the %d folds, so some test folds will lack it",
                label.item() if isinstance(label, np.generic) else label,
                n_units,
                "groups" if groups is not None else "samples",
                n_splits,
            )


def add_validation_folds(folds: Sequence[Fold]) -> list[Fold]:
    """Turn k test folds into train/val/test triples: fold k tests, fold k+1 (mod k) validates.

    The validation fold is used for early stopping, so the test fold stays untouched by model
    selection. Groups stay disjoint because the input test folds are.

    Raises:
        DataError: with fewer than 3 folds, where no training fold would remain.
    """
    n = len(folds)
    if n < 3:
        raise DataError(f"cross-validation with a validation fold needs at least 3 folds, got {n}")
    out = []
    for k, fold in enumerate(folds):
        val = folds[(k + 1) % n].test
        train = np.sort(np.concatenate([f.test for j, f in enumerate(folds) if j not in (k, (k + 1) % n)]))
        out.append(Fold(k, train, fold.test, val))
    return out


def split_from_column(values: Sequence[object], *, require_val: bool = False) -> Fold:
    """Build one fold from a split column holding ``train``, ``val`` or ``test`` per sample.

    Values are compared case-insensitively after stripping whitespace, and ``valid`` and
    ``validation`` mean ``val``.

    Raises:
        DataError: on other values, an empty training split, no held-out split, or a missing
            ``val`` split when ``require_val`` is set.
    """
    aliases = {"valid": "val", "validation": "val"}
    normalised = np.array([aliases.get(str(v).strip().lower(), str(v).strip().lower()) for v in values])
    invalid = sorted(set(normalised.tolist()) - set(SPLIT_NAMES))
    if invalid:
        raise DataError(f"split column has invalid values {invalid}. Allowed values are {list(SPLIT_NAMES)}")

    parts = {name: np.flatnonzero(normalised == name) for name in SPLIT_NAMES}
    if parts["train"].size == 0:
        raise DataError("split column has no 'train' rows")
    if require_val and parts["val"].size == 0:
        raise DataError("split column has no 'val' rows for early stopping. Add 'val' rows or drop --split-col")
    if parts["val"].size == 0 and parts["test"].size == 0:
        raise DataError("split column has no 'val' or 'test' rows to evaluate on")
    return Fold(0, parts["train"], parts["test"], parts["val"])


def check_group_leakage(folds: Sequence[Fold], groups: np.ndarray) -> None:
    """Raise ``DataError`` if a group occurs in two parts of a fold or in two test folds.

    Args:
        folds: folds to check.
        groups: (N,) group id of every sample.
    """
    groups = np.asarray(groups)
    for fold in folds:
        seen: dict[str, set] = {name: set(groups[idx].tolist()) for name, idx in fold.parts().items()}
        names = list(seen)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                shared = seen[first] & seen[second]
                if shared:
                    raise DataError(
                        f"group leakage in fold {fold.index}: {len(shared)} group(s) in both {first} and {second}, "
                        f"for example {sorted(map(str, shared))[:10]}"
                    )

    owner: dict[object, int] = {}
    for fold in folds:
        for group in set(groups[fold.test].tolist()):
            if group in owner and owner[group] != fold.index:
                raise DataError(f"group leakage: group {group!r} is in test folds {owner[group]} and {fold.index}")
            owner[group] = fold.index


def check_fold_classes(folds: Sequence[Fold], y: np.ndarray, *, task: str, ignore_value: object = None) -> None:
    """Raise ``DataError`` if any part of a fold is empty or contains a single class.

    Args:
        folds: folds to check.
        y: (N,) labels. Entries equal to ``ignore_value`` (missing labels) are not counted.
        task: name of the label, used in the message.
        ignore_value: label value that marks a missing label, or None.
    """
    y = np.asarray(y)
    for fold in folds:
        for name, idx in fold.parts().items():
            labels = y[idx]
            if ignore_value is not None:
                labels = labels[labels != ignore_value]
            classes = np.unique(labels).tolist()
            if not classes:
                raise DataError(f"fold {fold.index}: the {name} split has no labelled samples for {task!r}")
            if len(classes) == 1:
                raise DataError(
                    f"fold {fold.index}: the {name} split has only class {classes[0]!r} for {task!r} "
                    f"({labels.size} samples). Use fewer folds or add samples of the other classes"
                )
