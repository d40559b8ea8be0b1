"""Tile embeddings from the token sequence.

The official Virchow embedding concatenates the class token with the mean of the patch tokens
(2 x 1280 = 2560 floats). Virchow2 has 4 register tokens after the class token; they are excluded
from the mean, as the Virchow2 model card prescribes (patch tokens are ``tokens[:, 5:]``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from virchow.errors import ConfigError

EmbeddingKind = Literal["cls+mean", "cls", "mean", "patch_tokens"]
EMBEDDING_KINDS: tuple[str, ...] = get_args(EmbeddingKind)


def check_kind(kind: str) -> EmbeddingKind:
    """Return ``kind`` if valid, otherwise raise a ConfigError listing the valid kinds."""
    if kind not in EMBEDDING_KINDS:
        raise ConfigError(f"unknown embedding kind {kind!r}; valid kinds: {', '.join(EMBEDDING_KINDS)}")
    return kind  # type: ignore[return-value]


def pool_tokens(tokens: torch.Tensor, kind: str, num_prefix_tokens: int) -> torch.Tensor:
    """Turn final-layer tokens into an embedding.

    Args:
        tokens: (B, T, D) output of the model, class token first, then registers, then patches.
        kind: ``cls+mean`` (B, 2D), ``cls`` (B, D), ``mean`` (B, D) or ``patch_tokens`` (B, T - prefix, D).
        num_prefix_tokens: class token plus register tokens.

    Returns:
        The embedding in the dtype of ``tokens``.
    """
    cls_token = tokens[:, 0]
    patch_tokens = tokens[:, num_prefix_tokens:]
    if kind == "cls+mean":
        return torch.cat([cls_token, patch_tokens.mean(dim=1)], dim=-1)
    if kind == "cls":
        return cls_token
    if kind == "mean":
        return patch_tokens.mean(dim=1)
    if kind == "patch_tokens":
        return patch_tokens
    raise ConfigError(f"unknown embedding kind {kind!r}; valid kinds: {', '.join(EMBEDDING_KINDS)}")


def embedding_shape(kind: str, embed_dim: int, num_patch_tokens: int) -> tuple[int, ...]:
    """Return the per-image embedding shape for ``kind``."""
    check_kind(kind)
    if kind == "cls+mean":
        return (2 * embed_dim,)
    if kind == "patch_tokens":
        return (num_patch_tokens, embed_dim)
    return (embed_dim,)
