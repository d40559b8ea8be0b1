"""Kernel-density (KDE) uniformity regulariser, the Virchow2 replacement for KoLeo.

Virchow2 (Zimmermann et al., "Virchow2: Scaling Self-Supervised Mixed Magnification Models in
Pathology", arXiv:2408.00738) replaces KoLeo with an entropy estimate built on a kernel density
estimator, because KoLeo's log nearest-neighbour distance diverges when tiles are near-duplicates.
Here the density of each L2-normalised feature is a leave-one-out average of von Mises-Fisher
kernels, and the loss is the mean log density (minus an entropy estimate), which stays bounded:
its maximum, 0, is reached when all features coincide.

NOTE: the kernel and its concentration follow the paper's description and third-party re-implementations;
the exact constants of Paige's training code are not public.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KDELoss(nn.Module):
    """mean_i log( 1/(B-1) * sum_{j != i} exp(kappa * (x_i . x_j - 1)) ) over normalised features.

    Args:
        concentration: kappa of the von Mises-Fisher kernel; larger values make the kernel narrower.
        eps: used in the normalisation.
    """

    def __init__(self, concentration: float = 5.0, eps: float = 1e-8) -> None:
        super().__init__()
        if concentration <= 0:
            raise ValueError(f"concentration must be positive, got {concentration}")
        self.concentration = concentration
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the loss of (B, D) features as a float32 scalar; B must be at least 2."""
        n = features.shape[0]
        if n < 2:
            raise ValueError(f"the KDE regulariser needs at least 2 features, got {n}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
            exponents = self.concentration * (x @ x.t() - 1.0)
            self_pairs = torch.eye(n, dtype=torch.bool, device=x.device)
            exponents = exponents.masked_fill(self_pairs, float("-inf"))
            log_density = torch.logsumexp(exponents, dim=1) - math.log(n - 1)
            return log_density.mean()
