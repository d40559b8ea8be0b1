"""Slide tables, feature-file matching and bags of tiles for multiple-instance learning.

A bag is the set of tiles the model aggregates into one prediction: one slide, or all slides of a specimen or a
patient concatenated along the tile axis (``bag_by``). Slide ids in the table are matched to
feature-file names with a trailing ``.h5`` removed on both sides, and every mismatch is reported
by name before anything is trained.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from virchow.downstream.slide_features import feature_shape, read_slide_features, slide_id_from_name
from virchow.downstream.tile_inputs import format_names
from virchow.errors import DataError, EmptyBagError

_logger = logging.getLogger(__name__)

# Target value of a missing label, which the loss skips (the default ignore_index of torch's CrossEntropyLoss).
IGNORE_INDEX = -100

BagBy = Literal["slide", "specimen", "patient"]


@dataclass(frozen=True)
class Bag:
    """One training or prediction unit.

    Attributes:
        bag_id: slide, specimen or patient id, depending on ``bag_by``.
        slide_ids: slides whose tiles form the bag, in table order.
        paths: their feature files.
        n_tiles: tiles per slide.
        labels: class index per label column, ``IGNORE_INDEX`` where the label is missing.
        group: patient id used to keep folds disjoint (the bag id without a patient column).
        split: value of the split column, or None.
    """

    bag_id: str
    slide_ids: tuple[str, ...]
    paths: tuple[Path, ...]
    n_tiles: tuple[int, ...]
    labels: tuple[int, ...] = ()
    group: str = ""
    split: str | None = None


@dataclass
class BagTable:
    """Bags matched to feature files, with the label vocabulary.

    Attributes:
        bags: the bags, in table order of their first slide.
        label_cols: label column names, one classifier head each.
        classes: class names per label column, index order of the heads.
        feature_dim: D of every feature file.
        grouped: whether a patient column defined the groups.
        missing_features: table slide ids without a feature file.
        unlisted_files: feature-file slide ids absent from the table.
    """

    bags: list[Bag]
    label_cols: list[str]
    classes: list[list[str]]
    feature_dim: int
    grouped: bool
    missing_features: list[str] = field(default_factory=list)
    unlisted_files: list[str] = field(default_factory=list)

    def labels(self, task: int = 0) -> np.ndarray:
        """Return (B,) class indices of label column ``task``, ``IGNORE_INDEX`` where missing."""
        return np.array([bag.labels[task] for bag in self.bags], dtype=np.int64)

    def groups(self) -> np.ndarray:
        """Return (B,) group ids."""
        return np.array([bag.group for bag in self.bags], dtype=object)


def find_feature_files(features_dir: Path) -> dict[str, Path]:
    """Map slide id to feature file for every ``*.h5`` in ``features_dir``.

    When the folder has no ``.h5`` files but a ``features`` subfolder does (the layout of
    ``virchow embed-slides`` output), that subfolder is used.

    Raises:
        DataError: if the folder does not exist or two files normalise to the same slide id.
    """
    if not features_dir.is_dir():
        raise DataError(f"feature folder {features_dir} does not exist")
    files = sorted(p for p in features_dir.glob("*.h5") if not p.name.startswith("."))
    if not files and (features_dir / "features").is_dir():
        files = sorted(p for p in (features_dir / "features").glob("*.h5") if not p.name.startswith("."))
    found: dict[str, Path] = {}
    for path in files:
        slide_id = slide_id_from_name(path.name)
        if slide_id in found:
            raise DataError(f"two feature files have slide id {slide_id!r}: {found[slide_id]} and {path}")
        found[slide_id] = path
    return found


def load_bag_table(
    features_dir: Path,
    slides_csv: Path | None,
    *,
    slide_col: str = "slide_id",
    label_cols: list[str] | None = None,
    patient_col: str | None = None,
    specimen_col: str | None = None,
    split_col: str | None = None,
    bag_by: BagBy = "slide",
    classes: list[list[str]] | None = None,
) -> BagTable:
    """Match a slide table to feature files and group slides into bags.

    Args:
        features_dir: folder of per-slide ``.h5`` feature files.
        slides_csv: table with one row per slide. None makes every feature file its own unlabelled bag.
        slide_col: slide id column (a ``.h5`` suffix is ignored).
        label_cols: label columns, empty or None for unlabelled prediction.
        patient_col: patient id column, used as the group of grouped folds.
        specimen_col: specimen id column, needed for ``bag_by="specimen"``.
        split_col: column with train/val/test per slide.
        bag_by: ``slide``, ``specimen`` or ``patient``.
        classes: fixed class names per label column (from a checkpoint). Other values are
            rejected. None derives them from the table.

    Raises:
        DataError: on missing columns, duplicate slide ids, no match between table and files,
            conflicting labels, patients or splits inside one bag, or inconsistent feature sizes.
        EmptyBagError: if a bag has no tiles.
    """
    files = find_feature_files(features_dir)
    if slides_csv is None:
        table = pd.DataFrame({slide_col: sorted(files)})
    else:
        table = _read_slide_table(slides_csv, [slide_col, *(label_cols or []), patient_col, specimen_col, split_col])
    if table[slide_col].isna().any():
        raise DataError(
            f"{slides_csv}: {int(table[slide_col].isna().sum())} rows have no value in slide column {slide_col!r}"
        )
    table[slide_col] = table[slide_col].map(slide_id_from_name)
    duplicated = table[slide_col][table[slide_col].duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"{slides_csv}: slide ids listed more than once: {format_names(duplicated)}")

    missing, unlisted = _report_unmatched(table[slide_col].tolist(), files, slides_csv, features_dir)
    table = table[table[slide_col].isin(files)].reset_index(drop=True)
    for column in (patient_col, specimen_col if bag_by == "specimen" else None, split_col):
        if column and table[column].isna().any():
            empty_rows = table.index[table[column].isna()].tolist()
            raise DataError(
                f"{slides_csv}: column {column!r} is empty in {len(empty_rows)} matched rows (row numbers {empty_rows[:10]})"
            )

    label_cols = list(label_cols or [])
    if classes is None or not label_cols:
        classes = [_class_names(table[col]) for col in label_cols]
    elif len(classes) != len(label_cols):
        raise DataError(f"{len(label_cols)} label columns {label_cols} but class lists for {len(classes)}")
    label_index = [_label_indices(table[col], names, col) for col, names in zip(label_cols, classes, strict=True)]
    bag_col = {"slide": slide_col, "specimen": specimen_col, "patient": patient_col}[bag_by]
    if bag_col is None:
        raise DataError(f"--bag-by {bag_by} needs the {bag_by} id column (--{bag_by}-col)")
    if patient_col is None and table.shape[0]:
        _logger.warning(
            "no patient column given: folds are grouped by %s, so slides of one patient may cross folds", bag_by
        )

    shapes = {slide: feature_shape(files[slide]) for slide in table[slide_col]}
    feature_dim = _common_dim(shapes, files)

    bags = []
    for bag_id, rows in table.groupby(table[bag_col].astype(str), sort=False).groups.items():
        rows = list(rows)
        slides = tuple(table.loc[rows, slide_col])
        bag = Bag(
            bag_id=str(bag_id),
            slide_ids=slides,
            paths=tuple(files[s] for s in slides),
            n_tiles=tuple(shapes[s][0] for s in slides),
            labels=tuple(
                _bag_label(idx[rows].tolist(), bag_id, col) for idx, col in zip(label_index, label_cols, strict=True)
            ),
            group=_bag_value(table.loc[rows, patient_col].tolist(), bag_id, patient_col)
            if patient_col
            else str(bag_id),
            split=_bag_value(table.loc[rows, split_col].tolist(), bag_id, split_col) if split_col else None,
        )
        if sum(bag.n_tiles) == 0:
            raise EmptyBagError(f"bag {bag.bag_id!r} has no tiles: feature files of slides {list(slides)} are empty")
        empty = [s for s, n in zip(slides, bag.n_tiles, strict=True) if n == 0]
        if empty:
            _logger.warning("bag %s: slides without tiles: %s", bag.bag_id, format_names(empty))
        bags.append(bag)

    _logger.info("%d bags from %d slides (bag by %s), feature dim %d", len(bags), table.shape[0], bag_by, feature_dim)
    return BagTable(bags, label_cols, classes, feature_dim, patient_col is not None, missing, unlisted)


def slide_table_columns(path: Path) -> list[str]:
    """Return the column names of a slide table.

    Raises:
        DataError: if the file is missing or unreadable.
    """
    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except FileNotFoundError as exc:
        raise DataError(f"slide table not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read slide table {path}: {exc}") from exc


def _read_slide_table(path: Path, columns: list[str | None]) -> pd.DataFrame:
    wanted = [c for c in columns if c]
    try:
        table = pd.read_csv(path, dtype=dict.fromkeys(wanted, str), keep_default_na=True)
    except FileNotFoundError as exc:
        raise DataError(f"slide table not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read slide table {path}: {exc}") from exc
    absent = [c for c in wanted if c not in table.columns]
    if absent:
        raise DataError(f"{path} has no column {absent}. Available columns: {list(table.columns)}")
    for column in wanted:
        table[column] = table[column].str.strip()
    return table


def _report_unmatched(
    slide_ids: list[str], files: dict[str, Path], csv: Path | None, features_dir: Path
) -> tuple[list[str], list[str]]:
    listed = set(slide_ids)
    missing = [s for s in slide_ids if s not in files]
    unlisted = [s for s in files if s not in listed]
    if missing:
        _logger.warning(
            "%d slides in %s have no feature file in %s: %s", len(missing), csv, features_dir, format_names(missing)
        )
    if unlisted:
        _logger.warning(
            "%d feature files in %s are not in %s: %s", len(unlisted), features_dir, csv, format_names(unlisted)
        )
    if len(missing) == len(slide_ids):
        raise DataError(
            f"no slide in {csv} has a feature file in {features_dir}. Table ids such as {format_names(missing, 3)} "
            f"do not match file names such as {format_names(sorted(files), 3) or '(no .h5 files)'}"
        )
    return missing, unlisted


def _class_names(values: pd.Series) -> list[str]:
    names = sorted(set(values.dropna().astype(str)))
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def _label_indices(values: pd.Series, classes: list[str], column: str) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(values.dropna().astype(str)) - set(lookup))
    if unknown:
        raise DataError(f"label column {column!r} has values {unknown} outside the known classes {classes}")
    return np.array([IGNORE_INDEX if pd.isna(v) else lookup[str(v)] for v in values], dtype=np.int64)


def _bag_label(values: list[int], bag_id: str, column: str) -> int:
    """Return the label the slides of a bag share, ignoring slides without a label."""
    present = sorted(set(values) - {IGNORE_INDEX})
    if len(present) > 1:
        raise DataError(
            f"bag {bag_id!r} has slides with different labels (class indices {present}) in column {column!r}"
        )
    return present[0] if present else IGNORE_INDEX


def _bag_value(values: list[str], bag_id: str, column: str) -> str:
    """Return the patient or split value the slides of a bag share."""
    unique = sorted(set(values))
    if len(unique) > 1:
        raise DataError(f"bag {bag_id!r} has slides with different values {unique} in column {column!r}")
    return unique[0]


def _common_dim(shapes: dict[str, tuple[int, int]], files: dict[str, Path]) -> int:
    dims: dict[int, list[str]] = {}
    for slide, (_, dim) in shapes.items():
        dims.setdefault(dim, []).append(slide)
    if len(dims) > 1:
        detail = "; ".join(f"D={d}: {format_names(s, 3)}" for d, s in dims.items())
        raise DataError(f"feature files differ in feature dimension ({detail}). Embed all slides with one model")
    return next(iter(dims)) if dims else 0


class BagStore:
    """Load bag features from disk, keeping recently used bags in memory up to a byte budget.

    Args:
        cache_bytes: memory budget of the in-memory cache. With 0, every call reads from disk.
    """

    def __init__(self, cache_bytes: int = 4 << 30) -> None:
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def features(self, bag: Bag) -> np.ndarray:
        """Return the (N, D) float32 features of all slides of ``bag``, concatenated.

        Raises:
            EmptyBagError: if the bag has no tiles.
        """
        if bag.bag_id in self._cache:
            self._cache.move_to_end(bag.bag_id)
            return self._cache[bag.bag_id]
        parts = [read_slide_features(path, with_coords=False).features for path in bag.paths]
        features = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        if features.shape[0] == 0:
            raise EmptyBagError(f"bag {bag.bag_id!r} (slides {list(bag.slide_ids)}) has no tiles")
        self._remember(bag.bag_id, features)
        return features

    def _remember(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.cache_bytes:
            return
        self._cache[key] = features
        self._cached_bytes += features.nbytes
        while self._cached_bytes > self.cache_bytes:
            _, evicted = self._cache.popitem(last=False)
            self._cached_bytes -= evicted.nbytes
