"""Build Virchow variants through timm, on any device including ``meta``."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from timm.layers import SwiGLUPacked
from torch import nn

from virchow.models.registry import ModelSpec

_logger = logging.getLogger(__name__)

_MLP_LAYERS: dict[str, type[nn.Module]] = {"SwiGLUPacked": SwiGLUPacked}


def timm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """Return the full keyword arguments for ``timm.create_model``, layer classes included."""
    return {**spec.model_args, "mlp_layer": _MLP_LAYERS[spec.mlp_layer], "act_layer": nn.SiLU}


def build_model(spec: ModelSpec, *, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Build the variant's timm VisionTransformer with freshly initialised weights.

    Args:
        spec: the variant to build.
        device: where to allocate parameters; ``"meta"`` builds shapes only, without memory.
        **overrides: extra timm kwargs such as ``drop_path_rate`` (for training).

    Returns:
        The timm model in eval mode. Its weights are timm's random initialisation; callers load
        a checkpoint into it (see :func:`virchow.models.load_model`).
    """
    with torch.device(device):
        model = timm.create_model(spec.architecture, pretrained=False, **timm_kwargs(spec), **overrides)
    return model.eval()
