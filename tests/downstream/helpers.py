"""Helpers shared by the downstream tests."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np

KATHER_TABLE = Path(__file__).parents[1] / "data" / "tables" / "kather2016_texture_best2_43feat.csv"
TUMOUR = "01_TUMOR"


def run_command(module: ModuleType, argv: list[str]) -> int:
    """Parse ``argv`` with a command module's options and run it, as ``virchow <command>`` does."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def write_slide_h5(
    path: Path, features: np.ndarray, *, tile_size: float = 448.0, coords: np.ndarray | None = None
) -> np.ndarray:
    """Write a per-slide feature file laid out like embed-slides output; return the coords."""
    n = features.shape[0]
    if coords is None:
        side = max(1, int(np.ceil(np.sqrt(n))))
        coords = np.stack([(np.arange(n) % side) * tile_size, (np.arange(n) // side) * tile_size], axis=1)
    coords = np.asarray(coords, dtype=np.int64)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("features", data=features.astype(np.float32))
        handle.create_dataset("coords", data=coords)
        handle.attrs["patch_size_level0"] = float(tile_size)
        handle.attrs["slide_id"] = path.stem
        handle.attrs["tile_size"] = 224
    return coords
