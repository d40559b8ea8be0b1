"""Read per-slide tile features: ``virchow embed-slides`` output and TRIDENT/CLAM feature files.

A per-slide HDF5 file contains ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0
top-left (x, y) of each tile. The tile side in level-0 pixels (``patch_size_level0``) is read from
the file attributes (embed-slides), from the ``coords`` dataset attributes (TRIDENT), or computed
from CLAM's ``patch_size`` and ``patch_level`` attributes when the level is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from virchow.errors import DataError
from virchow.io.h5 import read_attrs


def slide_id_from_name(name: str) -> str:
    """Normalise a slide id: strip whitespace and a trailing ``.h5`` suffix, keep everything else."""
    text = str(name).strip()
    return text[: -len(".h5")] if text.lower().endswith(".h5") else text


@dataclass
class SlideFeatures:
    """Tile features of one slide.

    Attributes:
        slide_id: file name without the ``.h5`` suffix, the id that slide tables refer to.
        features: (N, D) float32.
        coords: (N, 2) int64 level-0 top-left (x, y), or None when the file has none.
        patch_size_level0: tile side in level-0 pixels, or None when unknown.
        attrs: file attributes.
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray | None
    patch_size_level0: float | None
    attrs: dict


def feature_shape(path: Path) -> tuple[int, int]:
    """Return (tiles, dims) of a feature file without reading the features.

    Raises:
        DataError: if the file cannot be read or has no 2-D ``features`` dataset.
    """
    with _open(path) as handle:
        return _features_shape(handle, path)


def read_slide_features(path: Path, *, with_coords: bool = True) -> SlideFeatures:
    """Read a per-slide feature file.

    Args:
        path: HDF5 file with ``features`` and, optionally, ``coords``.
        with_coords: also read coordinates and the tile size.

    Raises:
        DataError: on a missing or malformed dataset, or coordinates that do not match the features.
    """
    with _open(path) as handle:
        n_tiles, _ = _features_shape(handle, path)
        features = np.asarray(handle["features"][()], dtype=np.float32).reshape(n_tiles, -1)
        attrs = read_attrs(handle)
        coords = None
        patch_size = None
        if with_coords and "coords" in handle:
            coords = np.asarray(handle["coords"][()])
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            if coords.shape != (n_tiles, 2):
                raise DataError(f"{path}: coords have shape {coords.shape}, expected ({n_tiles}, 2)")
            coords = coords.astype(np.int64)
            patch_size = _patch_size_level0(attrs, read_attrs(handle["coords"]))
    return SlideFeatures(slide_id_from_name(path.name), features, coords, patch_size, attrs)


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise DataError(f"feature file not found: {path}") from exc
    except OSError as exc:
        raise DataError(f"cannot read feature file {path}: {exc}") from exc


def _features_shape(handle: h5py.File, path: Path) -> tuple[int, int]:
    if "features" not in handle:
        raise DataError(f"{path} has no 'features' dataset. Datasets present: {list(handle.keys())}")
    shape = handle["features"].shape
    # CLAM and some TRIDENT versions store a leading batch axis of size 1.
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise DataError(f"{path}: 'features' must be 2-D (tiles, dims), got shape {handle['features'].shape}")
    return int(shape[0]), int(shape[1])


def _patch_size_level0(file_attrs: dict, coords_attrs: dict) -> float | None:
    for attrs in (file_attrs, coords_attrs):
        value = attrs.get("patch_size_level0")
        if value not in (None, ""):
            return float(value)
    if coords_attrs.get("patch_size") not in (None, "") and int(coords_attrs.get("patch_level", -1)) == 0:
        return float(coords_attrs["patch_size"])
    return None
