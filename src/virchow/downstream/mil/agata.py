"""Agata, the aggregator with attention used for Virchow's pan-cancer specimen-level detector.

Vorontsov et al., "A foundation model for clinical-grade computational pathology and rare cancers
detection", Nature Medicine 2024. This follows the open reference implementation in Paige's
``paige-ml-sdk`` (``model_universe/nn/agata.py`` and ``nn/components/attention.py``):

1. keys ``k = act(Linear(F->512)(x))`` and values ``v = act(Linear(512->512)(k))``;
2. learned queries ``a = Linear(512->Q, bias=False)(k)``, padded tiles set to -inf, optionally
   divided by sqrt(key size), softmax over tiles;
3. bag embedding ``sum_q a_q^T v``, one classifier head per label.

This version differs from the reference in three ways. The heads return only logits, where the
reference also returns an activation of them. The returned attention is the softmax weight
averaged over queries, not the scores before the softmax. The reference's ``absolute_attention``
option is not implemented. Cost is linear in the number of tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from virchow.downstream.mil.attention import MILOutput, check_bag_input, masked_softmax

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class Agata(nn.Module):
    """Aggregator with attention: keys, values computed from keys, learned queries.

    Args:
        in_features: F, the tile embedding size (2560 for Virchow ``cls+mean``).
        n_classes: classes of each label head, for example ``[2]`` for one binary label.
        key_dim: size of the keys (512 in the reference).
        value_dim: size of the values and of the bag embedding (512 in the reference).
        n_queries: Q, learned queries whose outputs are summed (1 in the reference).
        activation: ``relu`` (reference default) or ``gelu``.
        scaled_attention: divide the scores by sqrt(key_dim) before the softmax.
        dropout: dropout rate on the bag embedding (0 in the reference).
    """

    def __init__(
        self,
        in_features: int,
        n_classes: Sequence[int],
        *,
        key_dim: int = 512,
        value_dim: int = 512,
        n_queries: int = 1,
        activation: Literal["relu", "gelu"] = "relu",
        scaled_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.key = nn.Linear(in_features, key_dim)
        self.value = nn.Linear(key_dim, value_dim)
        self.activation = ACTIVATIONS[activation]()
        self.queries = nn.Linear(key_dim, n_queries, bias=False)
        self.scale = 1.0 / math.sqrt(key_dim) if scaled_attention else 1.0
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(value_dim, k) for k in n_classes)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> MILOutput:
        """Aggregate (B, S, F) bags, where ``padding_mask`` (B, S) is True at padded tiles."""
        mask = check_bag_input(x, padding_mask)

        # keys and values, (B, S, key_dim) and (B, S, value_dim)
        keys = self.activation(self.key(x))
        values = self.activation(self.value(keys))

        # one softmax over tiles per query, (B, S, Q)
        weights = masked_softmax(self.queries(keys) * self.scale, mask)

        # (B, Q, S) x (B, S, value_dim), summed over queries
        embedding = self.dropout(weights.transpose(1, 2).bmm(values).sum(dim=1))
        logits = [head(embedding) for head in self.heads]
        return MILOutput(logits, weights.mean(dim=2), embedding)
