"""iBOT masked-patch loss: the student predicts the teacher's targets for patches it did not see.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (arXiv:2111.07832), in
the form DINOv2 (arXiv:2304.07193) uses: only masked positions count, every image weighs the same
whatever its number of masked patches, and targets come from Sinkhorn-Knopp or a running centre.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from virchow.pretrain.distributed import all_reduce_sum_
from virchow.pretrain.losses.centering import SoftmaxCentering, sinkhorn_knopp


class IBOTPatchLoss(nn.Module):
    """Cross-entropy on masked patch tokens.

    Args:
        n_prototypes: K, the output dimension of the patch head.
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
        """Turn (M, K) teacher logits of the masked patches of all images into (M, K) targets."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return self.softmax_center(teacher_logits, teacher_temp)

    def forward(self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Return the masked-patch loss averaged over images.

        Each image contributes the mean cross-entropy over its masked patches. Images without a
        masked patch contribute 0 but still count in the mean over images, as in DINOv2.

        Args:
            student_logits: (M, K) student logits of the masked patches, in the row-major order of
                ``masks.nonzero()``.
            teacher_targets: (M, K) teacher targets for the same patches.
            masks: (N, P) bool, True where a patch of image n was masked.

        Returns:
            A float32 scalar.
        """
        n_images = masks.shape[0]
        if n_images == 0:
            return student_logits.sum() * 0.0
        per_patch = -(teacher_targets * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(dim=-1)
        masked_per_image = masks.sum(dim=1).clamp(min=1).float()
        image_of_patch = masks.nonzero(as_tuple=True)[0]
        weights = 1.0 / masked_per_image[image_of_patch]
        return (per_patch * weights).sum() / n_images


def count_masked(masks: torch.Tensor) -> int:
    """Return the number of masked patches over all ranks."""
    return int(all_reduce_sum_(masks.sum().to(torch.float32)).item())
