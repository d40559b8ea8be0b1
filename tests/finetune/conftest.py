"""Synthetic tile sets and a config factory for the fine-tuning tests.

Every run uses the tiny ``virchow-test`` model with ``random:0`` weights, fp32 on the CPU and no
DataLoader workers, so results are deterministic and a run takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from virchow.finetune import FinetuneConfig

CLASSES = ("pink", "purple")


def write_separable_tiles(root: Path, per_class: int, *, size: int = 224, seed: int = 0) -> Path:
    """Write two classes that differ clearly: smooth pink tiles and darker purple striped tiles."""
    rng = np.random.default_rng(seed)
    stripes = ((np.arange(size) // 8) % 2 * 50)[None, :, None]
    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 12, (size, size, 3))
            if name == "pink":
                pixels = np.array([230, 150, 190]) + noise
            else:
                pixels = np.array([110, 60, 160]) + noise + stripes
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def separable_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder of 2 x 8 tiles of 224 x 224 pixels."""
    return write_separable_tiles(tmp_path_factory.mktemp("separable"), per_class=8)


def make_config(data: Path | str, out_dir: Path, **overrides: Any) -> FinetuneConfig:
    """Return a fast, deterministic test config; ``overrides`` replace any field."""
    values: dict[str, Any] = {
        "data": str(data),
        "out_dir": str(out_dir),
        "model": "virchow-test",
        "weights": "random:0",
        "device": "cpu",
        "precision": "fp32",
        "num_workers": 0,
        "batch_size": 4,
        "val_fraction": 0.25,
        "patience": 0,
        "warmup_epochs": 0.5,
        "epochs": 3,
    }
    values.update(overrides)
    return FinetuneConfig(**values)


def read_records(run_dir: Path, event: str) -> list[dict[str, Any]]:
    """Return the ``metrics.jsonl`` records of one event type (``step`` or ``epoch``)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]
