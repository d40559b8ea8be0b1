"""Training checkpoints: atomic writes, safe reads, and seeding and saving the random generators.

A checkpoint stores only the trainable parameters (the head, the adapters or the unfrozen blocks),
with the optimiser, schedule, gradient-scaler and RNG states and the resolved config. Frozen
weights are rebuilt from the base weights named in the config, whose SHA-256 is compared on resume.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from virchow.errors import ConfigError

CHECKPOINT_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a DataLoader worker from the torch seed the loader gave it."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the Python, NumPy, torch CPU and CUDA generator states as tensors and plain values."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states saved by :func:`capture_rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples, but a round trip through some serialisers turns them into lists.
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(item) for item in value)
    return value


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` with ``torch.save`` to a temporary file and rename it over ``path``.

    A crash while writing leaves the previous checkpoint intact.
    """
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        ConfigError: the file is missing, unreadable, or of another format version.
    """
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found: resume needs the run directory of an earlier run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as exc:
        raise ConfigError(f"checkpoint {path} is not readable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ConfigError(f"checkpoint {path} has format {found!r}, but this version reads only format {CHECKPOINT_FORMAT}")
    return payload
