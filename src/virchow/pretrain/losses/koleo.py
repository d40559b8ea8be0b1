"""KoLeo regulariser: spread features by pushing each one away from its nearest neighbour.

Reference: Sablayrolles et al., "Spreading vectors for similarity search" (arXiv:1806.03198), used
by DINOv2 on the student's class tokens. It is the Kozachenko-Leonenko differential-entropy
estimator up to constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """-mean_i log(min_{j != i} ||x_i - x_j||) over L2-normalised features.

    The loss diverges when two features coincide, which near-duplicate tiles make likely in
    pathology; :class:`virchow.pretrain.losses.kde.KDELoss` is the bounded alternative.

    Args:
        eps: smoothing of the distance and its logarithm, and of the normalisation.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the loss of (B, D) features as a float32 scalar; B must be at least 2."""
        if features.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 features to find neighbours, got {features.shape[0]}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            similarity = (x @ x.t()).detach()
            similarity.fill_diagonal_(-2.0)  # below any cosine similarity, so a point is not its own neighbour
            neighbour = similarity.argmax(dim=1)
            # eps inside the square root keeps the gradient finite when two features coincide.
            distances = torch.sqrt(((x - x[neighbour]) ** 2).sum(dim=-1) + self.eps**2)
            return -torch.log(distances + self.eps).mean()
