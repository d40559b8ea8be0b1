"""DINO class-token loss: cross-entropy between teacher targets and student predictions.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO,
arXiv:2104.14294), as extended to several crops and Sinkhorn-Knopp targets by DINOv2
(arXiv:2304.07193).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from virchow.pretrain.losses.centering import SoftmaxCentering, sinkhorn_knopp


class DINOLoss(nn.Module):
    """Cross-entropy of student class-token predictions against teacher targets.

    Args:
        n_prototypes: K, the output dimension of the projection head.
        student_temp: temperature of the student softmax.
        centering: ``sinkhorn_knopp`` or ``softmax`` (running-mean centre).
        center_momentum: momentum of the running centre (``softmax`` only).
        sinkhorn_iterations: rounds of Sinkhorn-Knopp (``sinkhorn_knopp`` only).
    """

    def __init__(
        self,
        n_prototypes: int,
        *,
        student_temp: float = 0.1,
        centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"centering must be 'sinkhorn_knopp' or 'softmax', got {centering!r}")
        self.student_temp = student_temp
        self.centering = centering
        self.sinkhorn_iterations = sinkhorn_iterations
        self.softmax_center = SoftmaxCentering(n_prototypes, center_momentum)

    @torch.no_grad()
    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Turn (B, K) teacher logits into (B, K) targets; ``softmax`` also updates its centre."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return self.softmax_center(teacher_logits, teacher_temp)

    def forward(
        self,
        student_logits: Sequence[torch.Tensor],
        teacher_targets: Sequence[torch.Tensor],
        *,
        skip_same_index: bool = False,
    ) -> torch.Tensor:
        """Sum, over pairs of student and teacher crops, of the batch-mean cross-entropy.

        For each pair the loss is mean over b of -sum_k t[b, k] * log_softmax(s[b] / student_temp)[k].

        Args:
            student_logits: one (B, K) tensor per student crop.
            teacher_targets: one (B, K) tensor per teacher crop; rows are distributions.
            skip_same_index: leave out pairs whose student and teacher crop have the same index
                (a global crop is not compared with itself).

        Returns:
            The summed loss as a float32 scalar; divide by the number of pairs for the mean.
        """
        total = torch.zeros((), device=student_logits[0].device)
        for i, student in enumerate(student_logits):
            log_probs = F.log_softmax(student.float() / self.student_temp, dim=-1)
            for j, target in enumerate(teacher_targets):
                if skip_same_index and i == j:
                    continue
                total = total - (target * log_probs).sum(dim=-1).mean()
        return total
