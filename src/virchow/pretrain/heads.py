"""Projection head with prototypes, as in DINO and DINOv2.

An MLP maps a token to a bottleneck, the result is L2-normalised, and the logits are its cosine
similarities with K learnable prototypes. DINOv2 writes the last layer as a weight-normalised
linear layer with the norm fixed to 1, which is the same as normalising every prototype row. This
module therefore stores the prototypes as a plain (K, bottleneck) parameter and normalises them in
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP plus cosine-similarity prototypes.

    Args:
        in_dim: token width of the backbone.
        n_prototypes: K, the number of output logits.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the normalised features compared with the prototypes.
        n_layers: linear layers of the MLP (1 maps straight to the bottleneck).
    """

    def __init__(
        self, in_dim: int, n_prototypes: int, *, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, bottleneck_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise linear weights with a truncated normal (std 0.02) and biases with zeros."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map (N, in_dim) tokens to (N, K) cosine-similarity logits in [-1, 1]."""
        features = self.mlp(tokens)
        # An eps of 1e-6 stays representable in fp16, unlike F.normalize's default 1e-12.
        features = F.normalize(features, p=2, dim=-1, eps=1e-6)
        prototypes = F.normalize(self.prototypes, p=2, dim=-1, eps=1e-6)
        return F.linear(features, prototypes.to(features.dtype))
