"""DINO class-token loss: cross-entropy between teacher targets and student predictions.

Reference: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO,
arXiv:2104.14294), as extended to several crops and Sinkhorn-Knopp targets by DINOv2
(arXiv:2304.07193).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from virchow.pretrain.losses.centering import CenteredTargetLoss


class DINOLoss(CenteredTargetLoss):
    """Cross-entropy of student class-token predictions against teacher targets.

    Constructor arguments are those of :class:`CenteredTargetLoss`.
    """

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
