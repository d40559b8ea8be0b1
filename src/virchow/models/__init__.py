"""The Virchow model family: registry, construction through timm, weight loading and pooling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from virchow.models.checkpoint import check_state_dict, read_state_dict
from virchow.models.factory import build_model, timm_kwargs
from virchow.models.pooling import EMBEDDING_KINDS, embedding_shape, pool_tokens
from virchow.models.registry import ModelSpec, PreprocessConfig, get_model_spec, list_models, register_model
from virchow.models.weights import WeightsProvenance, check_config, provenance_of, resolve_weights

_logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A Virchow backbone with the spec it was built from and the provenance of its weights.

    Attributes:
        model: timm VisionTransformer in eval mode; ``model(x)`` returns (B, T, D) tokens.
        spec: the variant.
        provenance: where the weights came from, their SHA-256 and whether they are random.
    """

    model: nn.Module
    spec: ModelSpec
    provenance: WeightsProvenance


def load_model(
    name: str = "virchow", weights: str | None = None, *, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Build a registered variant and load its weights strictly.

    Args:
        name: registry name (``virchow``, ``virchow2``, ``virchow-test``, ``virchow2-test``).
        weights: ``hf-hub:OWNER/REPO[@REV]``, a directory or checkpoint file, or ``random[:SEED]``.
            None means the variant's official Hugging Face repository.
        device: where the loaded parameters are placed.

    Returns:
        The model in eval mode with its provenance. Random weights are used only when ``weights``
        is ``random[:SEED]``, never as a fallback.

    Raises:
        UnknownModelError: ``name`` is not registered.
        WeightsAccessError, WeightsFormatError, WeightsMismatchError: see :mod:`virchow.models.weights`.
    """
    spec = get_model_spec(name)
    resolved = resolve_weights(weights, spec)

    if resolved.random:
        _logger.warning(
            "model %s uses RANDOM weights (%s): embeddings are meaningless except for dry runs and tests",
            name,
            resolved.source,
        )
        torch.manual_seed(resolved.seed or 0)
        model = build_model(spec, device=device)
        return LoadedModel(model=model, spec=spec, provenance=provenance_of(resolved))

    check_config(resolved.config, spec, resolved.source)
    _logger.info("loading %s weights from %s", name, resolved.source)
    state_dict = read_state_dict(resolved.checkpoint)
    model = build_model(spec, device="meta")
    expected = {key: value.shape for key, value in model.state_dict().items()}
    check_state_dict(expected, state_dict, model_name=name, source=resolved.source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device).eval()

    provenance = provenance_of(resolved)
    _logger.info("loaded %s: %s", name, ", ".join(f"{k} sha256={v[:12]}" for k, v in provenance.files.items()))
    return LoadedModel(model=model, spec=spec, provenance=provenance)


__all__ = [
    "EMBEDDING_KINDS",
    "LoadedModel",
    "ModelSpec",
    "PreprocessConfig",
    "WeightsProvenance",
    "build_model",
    "embedding_shape",
    "get_model_spec",
    "list_models",
    "load_model",
    "pool_tokens",
    "register_model",
    "timm_kwargs",
]
from virchow.models import small as small  # noqa: E402  (registers vit-s14-swiglu and vit-b14-swiglu)
