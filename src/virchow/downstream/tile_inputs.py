"""Labelled tile features for the probe: embeddings HDF5 + labels CSV, or a plain feature table.

The embeddings file is the output of ``virchow embed-tiles``: ``features`` (N, D) float32 and
``paths`` (N,) strings relative to the input root, with the model provenance in its attributes.
The table input is a CSV or parquet file with one row per tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pandas as pd

from virchow.errors import DataError
from virchow.io.h5 import read_attrs

_logger = logging.getLogger(__name__)

# How many unmatched names a log line lists before it switches to a count.
MAX_NAMES_LOGGED = 20


@dataclass
class LabelledFeatures:
    """Tile features with labels, ready for the probe.

    Attributes:
        features: (N, D) float32 features.
        labels: (N,) class names as strings.
        ids: (N,) tile identifiers (relative path or row number), used in prediction files.
        groups: (N,) group ids (patients) or None.
        splits: (N,) split names (``train``/``val``/``test``) or None.
        source: provenance for the report: input kind, file names, model attributes.
    """

    features: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    groups: np.ndarray | None = None
    splits: np.ndarray | None = None
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        for name in ("labels", "ids", "groups", "splits"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise DataError(f"{name} has {len(value)} entries but there are {n} feature rows")
        if not np.isfinite(self.features).all():
            bad = np.flatnonzero(~np.isfinite(self.features).all(axis=1))
            raise DataError(f"{bad.size} feature rows contain NaN or Inf, for example ids {self.ids[bad[:5]].tolist()}")


def format_names(names: list[str], limit: int = MAX_NAMES_LOGGED) -> str:
    """Join names for a log line, listing at most ``limit`` and counting the rest."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def normalise_tile_path(path: str) -> str:
    """Return a relative POSIX path without a leading ``./``, so CSV and HDF5 paths compare equal."""
    text = str(path).strip().replace("\\", "/")
    return PurePosixPath(text).as_posix().removeprefix("./")


def read_embeddings_h5(path: Path) -> tuple[np.ndarray, list[str], dict]:
    """Read ``features``, ``paths`` and the attributes of an embed-tiles HDF5 file.

    Raises:
        DataError: if the file lacks a dataset or the two datasets differ in length.
    """
    try:
        with h5py.File(path, "r") as handle:
            missing = [name for name in ("features", "paths") if name not in handle]
            if missing:
                raise DataError(f"{path} has no dataset {missing}. Expected the output of 'virchow embed-tiles'")
            features = handle["features"][()].astype(np.float32, copy=False)
            paths = [p.decode() if isinstance(p, bytes) else str(p) for p in handle["paths"][()]]
            attrs = read_attrs(handle)
    except OSError as exc:
        raise DataError(f"cannot read embeddings file {path}: {exc}") from exc
    if features.ndim != 2:
        raise DataError(
            f"{path}: features must be 2-D (tiles, dims), got shape {features.shape}. Patch-token embeddings cannot be probed"
        )
    if features.shape[0] != len(paths):
        raise DataError(f"{path}: {features.shape[0]} feature rows but {len(paths)} paths")
    return features, paths, attrs


def load_embeddings_with_labels(
    embeddings: Path,
    labels_csv: Path,
    *,
    path_col: str = "path",
    label_col: str = "label",
    group_col: str | None = None,
    split_col: str | None = None,
) -> LabelledFeatures:
    """Join an embeddings HDF5 with a labels CSV on the tile path.

    Rows of the CSV without an embedding and embeddings without a label row are logged by name
    and left out.

    Raises:
        DataError: on missing columns, duplicate paths, missing labels or an empty join.
    """
    features, paths, attrs = read_embeddings_h5(embeddings)
    table = _read_table(labels_csv)
    _require_columns(table, [path_col, label_col, group_col, split_col], labels_csv)

    table = table.assign(_key=table[path_col].map(normalise_tile_path))
    duplicated = table["_key"][table["_key"].duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"{labels_csv}: paths listed more than once: {format_names(duplicated)}")
    keys = [normalise_tile_path(p) for p in paths]
    row_of_key = {key: i for i, key in enumerate(keys)}

    without_embedding = [key for key in table["_key"] if key not in row_of_key]
    if without_embedding:
        _logger.warning(
            "%d labelled paths have no embedding: %s", len(without_embedding), format_names(without_embedding)
        )
    labelled = set(table["_key"])
    without_label = [key for key in keys if key not in labelled]
    if without_label:
        _logger.warning("%d embedded paths have no label row: %s", len(without_label), format_names(without_label))

    table = table[table["_key"].isin(row_of_key)]
    if table.empty:
        raise DataError(
            f"no path in {labels_csv} column {path_col!r} matches an embedded path in {embeddings}. "
            f"CSV examples {format_names(without_embedding, 3)}, HDF5 examples {format_names(keys, 3)}"
        )
    _reject_missing(table, label_col, labels_csv)
    rows = table["_key"].map(row_of_key).to_numpy()
    return LabelledFeatures(
        features=features[rows],
        labels=table[label_col].astype(str).to_numpy(),
        ids=table["_key"].to_numpy(dtype=object),
        groups=_optional_column(table, group_col, labels_csv),
        splits=_optional_column(table, split_col, labels_csv),
        source={"kind": "embeddings", "embeddings": str(embeddings), "labels": str(labels_csv), "attributes": attrs},
    )


def load_feature_table(
    table_path: Path,
    *,
    label_col: str = "label",
    feature_prefix: str | None = None,
    exclude_cols: list[str] | None = None,
    id_col: str | None = None,
    group_col: str | None = None,
    split_col: str | None = None,
) -> LabelledFeatures:
    """Load a CSV or parquet table with one row per tile.

    Feature columns are those starting with ``feature_prefix`` or, without a prefix, every numeric
    column other than the label, id, group, split and excluded columns.

    Raises:
        DataError: on missing columns, non-numeric features, missing labels, or a feature column
            that maps one-to-one onto the label (for example a ``label_idx`` column), which would
            leak the answer into the probe.
    """
    table = _read_table(table_path)
    _require_columns(table, [label_col, id_col, group_col, split_col, *(exclude_cols or [])], table_path)
    _reject_missing(table, label_col, table_path)

    reserved = {c for c in (label_col, id_col, group_col, split_col, *(exclude_cols or [])) if c}
    if feature_prefix:
        columns = [c for c in table.columns if str(c).startswith(feature_prefix) and c not in reserved]
        non_numeric = [c for c in columns if not pd.api.types.is_numeric_dtype(table[c])]
        if non_numeric:
            raise DataError(f"{table_path}: columns with prefix {feature_prefix!r} are not numeric: {non_numeric}")
    else:
        columns = [c for c in table.columns if c not in reserved and pd.api.types.is_numeric_dtype(table[c])]
    if not columns:
        raise DataError(f"{table_path}: no feature columns found (prefix {feature_prefix!r}). Check --feature-prefix")
    _reject_label_leak(table, columns, label_col, table_path)

    ids = (
        table[id_col].astype(str).to_numpy(dtype=object)
        if id_col
        else np.array([str(i) for i in table.index], dtype=object)
    )
    _logger.info("loaded %d rows x %d feature columns from %s", len(table), len(columns), table_path)
    return LabelledFeatures(
        features=table[columns].to_numpy(dtype=np.float32),
        labels=table[label_col].astype(str).to_numpy(),
        ids=ids,
        groups=_optional_column(table, group_col, table_path),
        splits=_optional_column(table, split_col, table_path),
        source={"kind": "table", "table": str(table_path), "feature_columns": columns},
    )


def _read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except FileNotFoundError as exc:
        raise DataError(f"table not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read table {path}: {exc}") from exc


def _require_columns(table: pd.DataFrame, columns: list[str | None], path: Path) -> None:
    missing = [c for c in columns if c and c not in table.columns]
    if missing:
        raise DataError(f"{path} has no column {missing}. Available columns: {list(map(str, table.columns))}")


def _reject_missing(table: pd.DataFrame, label_col: str, path: Path) -> None:
    missing = table[label_col].isna()
    if missing.any():
        raise DataError(f"{path}: {int(missing.sum())} rows have no value in label column {label_col!r}")


def _optional_column(table: pd.DataFrame, column: str | None, path: Path) -> np.ndarray | None:
    if not column:
        return None
    if table[column].isna().any():
        raise DataError(f"{path}: column {column!r} has {int(table[column].isna().sum())} empty values")
    return table[column].astype(str).to_numpy(dtype=object)


def _reject_label_leak(table: pd.DataFrame, columns: list[str], label_col: str, path: Path) -> None:
    n_classes = table[label_col].nunique()
    if n_classes < 2:
        return
    for column in columns:
        if table[column].nunique() != n_classes:
            continue
        if (table.groupby(label_col)[column].nunique() == 1).all():
            raise DataError(
                f"{path}: feature column {column!r} encodes the label {label_col!r} one-to-one, so the probe would see the label itself. "
                "Select features with --feature-prefix or drop the column with --exclude-cols"
            )
