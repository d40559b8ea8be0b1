"""Pieces shared by the attention aggregators: output type, input checks and masked softmax."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from virchow.errors import EmptyBagError


class MILOutput(NamedTuple):
    """Output of an aggregator.

    Attributes:
        logits: one (B, K_t) tensor per label head, before softmax.
        attention: (B, S) tile weights. Each bag's weights sum to 1 and padded tiles get 0.
        embedding: (B, H) attention-pooled bag embedding.
    """

    logits: list[Tensor]
    attention: Tensor
    embedding: Tensor


def check_bag_input(x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
    """Validate a (B, S, F) bag batch and its (B, S) padding mask (True marks padding).

    Returns:
        The mask as a bool tensor, or None.

    Raises:
        ValueError: on wrong shapes.
        EmptyBagError: if a bag has no tiles or only padding.
    """
    if x.ndim != 3:
        raise ValueError(f"expected bags of shape (batch, tiles, features), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise EmptyBagError("a bag has no tiles, but the aggregator needs at least one")
    if padding_mask is None:
        return None
    if padding_mask.shape != x.shape[:2]:
        raise ValueError(f"padding mask must have shape {tuple(x.shape[:2])}, got {tuple(padding_mask.shape)}")
    mask = padding_mask.to(torch.bool)
    empty = torch.nonzero(mask.all(dim=1)).flatten().tolist()
    if empty:
        raise EmptyBagError(f"bags at batch positions {empty} contain only padding")
    return mask


def masked_softmax(scores: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Softmax over the tile axis (dim 1) with padded positions set to -inf, so they get weight 0."""
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask.unsqueeze(-1) if scores.ndim == 3 else padding_mask, float("-inf"))
    return torch.softmax(scores, dim=1)
