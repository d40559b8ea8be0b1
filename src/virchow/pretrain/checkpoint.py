"""Training checkpoints that let a run continue exactly where it stopped.

A checkpoint contains the student, the teacher, the loss modules' running state, the optimiser (one
shard per rank under FSDP), the gradient scaler, every rank's torch random state, the next
iteration, the stream position and the configuration. Schedules are functions of the iteration and the data stream is a function of its
position, so nothing else is needed. Files are written atomically by rank 0 and read with
``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from virchow.errors import ConfigError
from virchow.pretrain.distributed import DistributedContext, all_gather_object

_logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
FORMAT_VERSION = 1


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Return the folder of the run's checkpoints."""
    return Path(output_dir) / CHECKPOINT_DIR


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Return this process's torch random state (CPU, and the current CUDA device if used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore a state returned by :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Collect every rank's random state, in rank order (every rank must call this)."""
    return all_gather_object(rng_state(device))  # type: ignore[return-value]


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, *, iteration: int, keep: int) -> Path:
    """Write ``state`` as ``last.pt`` and, when ``keep`` > 0, as ``iter_NNNNNNN.pt``; prune older numbered files.

    Call on rank 0 only. The file appears under its final name only once fully written.

    Returns:
        The path of ``last.pt``.
    """
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / LAST
    tmp = folder / f".{LAST}.tmp"
    torch.save({**state, "format_version": FORMAT_VERSION}, tmp)
    os.replace(tmp, last)

    if keep > 0:
        numbered = folder / f"iter_{iteration:07d}.pt"
        numbered_tmp = folder / f".{numbered.name}.tmp"
        try:
            os.link(last, numbered_tmp)
        except OSError:
            shutil.copyfile(last, numbered_tmp)
        os.replace(numbered_tmp, numbered)
        for old in sorted(folder.glob("iter_*.pt"))[:-keep]:
            old.unlink()
    _logger.info("saved checkpoint at iteration %d to %s", iteration, last)
    return last


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU.

    Raises:
        ConfigError: the file is missing, unreadable or of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path} is not a virchow pretraining checkpoint of format version {FORMAT_VERSION}"
        )
    return state


def restore_rng(state: dict[str, Any], ctx: DistributedContext, device: torch.device) -> bool:
    """Restore this rank's random state from a checkpoint; return False when the world size changed."""
    states = state["rng"]
    if len(states) != ctx.world_size:
        _logger.warning(
            "the checkpoint was written by %d ranks and this run has %d: random states (drop path) are "
            "re-seeded, so the run continues but not bit-identically",
            len(states), ctx.world_size,
        )
        return False
    set_rng_state(states[ctx.rank], device)
    return True
