"""Export the teacher backbone in the Hugging Face layout that ``--weights DIR`` loads.

DINOv2 evaluates and releases the teacher, which is the EMA of the student and usually the better
model. Only the backbone is exported; the heads and the mask token are training-only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from virchow.models import build_model, get_model_spec
from virchow.models.export import save_pretrained
from virchow.pretrain.checkpoint import load_checkpoint
from virchow.pretrain.config import config_from_dict

_logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."


def backbone_state_dict(network_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Select the backbone entries of an :class:`~virchow.pretrain.meta_arch.SSLNetwork` state dict, without the prefix."""
    return {key[len(BACKBONE_PREFIX) :]: value for key, value in network_state.items() if key.startswith(BACKBONE_PREFIX)}


def export_backbone(
    network_state: dict[str, torch.Tensor], model_name: str, directory: str | Path, *, provenance: dict[str, Any]
) -> Path:
    """Write the backbone of a network state dict as ``config.json`` plus ``model.safetensors``.

    The state is loaded strictly into a freshly built variant first, so a mismatch fails here and
    not when someone loads the export.

    Args:
        network_state: full state dict of the teacher (or student) network.
        model_name: registry name of the backbone variant.
        directory: output folder, created if missing.
        provenance: JSON-serialisable facts stored in ``config.json`` under ``virchow``.

    Returns:
        The path of the weight file.
    """
    spec = get_model_spec(model_name)
    backbone = build_model(spec, device="meta")
    backbone.load_state_dict(backbone_state_dict(network_state), strict=True, assign=True)
    path = save_pretrained(backbone, spec, directory, extra=provenance)
    _logger.info("exported the teacher backbone (%s) to %s", model_name, Path(directory))
    return path


def export_checkpoint(checkpoint: str | Path, directory: str | Path, *, network: str = "teacher") -> Path:
    """Export the teacher (or the student) backbone of a training checkpoint.

    Raises:
        ConfigError: the checkpoint cannot be read.
        ValueError: ``network`` is neither ``teacher`` nor ``student``.
    """
    if network not in ("teacher", "student"):
        raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    provenance = {
        "pretrain_network": network,
        "pretrain_iteration": int(state["iteration"]),
        "pretrain_git_commit": state.get("git_commit", "unknown"),
        "pretrain_init_weights": cfg.model.weights,
    }
    return export_backbone(state[network], cfg.model.name, directory, provenance=provenance)
