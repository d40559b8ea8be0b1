"""Gated-attention multiple-instance learning (ABMIL).

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018,
https://arxiv.org/abs/1802.04712. Tiles are projected by ``Linear(F->M) + ReLU`` into h_k. The
gated attention score of tile k is ``w^T (tanh(V h_k) * sigmoid(U h_k))``. The bag embedding is
the attention-weighted sum of the h_k, and each label head is a linear layer on it.

Memory and time are linear in the number of tiles (no tile-to-tile attention), so a bag of 100k
tiles costs about as much as 100k independent tile projections.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from virchow.downstream.mil.attention import MILOutput, check_bag_input, masked_softmax


class GatedABMIL(nn.Module):
    """Gated-attention MIL aggregator with one linear head per label.

    Args:
        in_features: F, the tile embedding size (2560 for Virchow ``cls+mean``).
        n_classes: classes of each label head, for example ``[2]`` for one binary label.
        hidden_dim: M, size of the projected tiles and of the bag embedding.
        attention_dim: L, size of the gated attention branches.
        dropout: dropout rate after the projection and on the bag embedding.
    """

    def __init__(
        self,
        in_features: int,
        n_classes: Sequence[int],
        *,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid())
        self.attention_w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, k) for k in n_classes)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> MILOutput:
        """Aggregate (B, S, F) bags, where ``padding_mask`` (B, S) is True at padded tiles."""
        mask = check_bag_input(x, padding_mask)

        # tile projection and gated attention scores, (B, S, M) and (B, S)
        h = self.projection(x)
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)
        attention = masked_softmax(scores, mask)

        # attention pooling, then one head per label
        embedding = self.dropout(attention.unsqueeze(1).bmm(h).squeeze(1))
        logits = [head(embedding) for head in self.heads]
        return MILOutput(logits, attention, embedding)
