"""iBOT masked-patch loss: the student predicts the teacher's targets for patches it did not see.

Reference: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (arXiv:2111.07832), in
the form DINOv2 (arXiv:2304.07193) uses: only masked positions count, every image weighs the same
whatever its number of masked patches, and targets come from Sinkhorn-Knopp or a running centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from virchow.pretrain.distributed import all_reduce_sum_
from virchow.pretrain.losses.centering import CenteredTargetLoss


class IBOTPatchLoss(CenteredTargetLoss):
    """Cross-entropy on masked patch tokens.

    Constructor arguments are those of :class:`CenteredTargetLoss`.
    """

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
