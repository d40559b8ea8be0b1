"""Teacher-output normalisation: Sinkhorn-Knopp (DINOv2, SwAV) and running-mean centring (DINO).

Both turn teacher logits (B, K) into target distributions (B, K) whose rows sum to 1 and that do
not collapse onto a few prototypes. References: Caron et al., "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments" (SwAV, arXiv:2006.09882); Caron et al., "Emerging
Properties in Self-Supervised Vision Transformers" (DINO, arXiv:2104.14294); Oquab et al.,
"DINOv2" (arXiv:2304.07193).
"""

from __future__ import annotations

import torch
from torch import nn

from virchow.pretrain.distributed import all_reduce_max_, all_reduce_sum_


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Turn teacher logits into a balanced soft assignment with Sinkhorn-Knopp.

    The exponentiated logits form a (K, B) matrix Q over prototypes and samples. Each round scales
    the rows so that every prototype carries a total of 1/K, then the columns so that every sample
    carries 1/B. The result is multiplied by B, so every returned row sums to exactly 1 (the last
    step normalises samples) and each prototype receives about B/K in total. Sums and the sample
    count run over all ranks, so the normalisation covers the global batch.

    Args:
        logits: (B, K) teacher logits of this rank; B may be 0 on some ranks.
        temperature: teacher temperature; the logits are divided by it before exponentiation.
        n_iterations: normalisation rounds.

    Returns:
        (B, K) float32 targets.
    """
    scaled = logits.float() / temperature
    # Subtracting the global maximum leaves the normalised result unchanged and keeps exp finite.
    local_max = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
    global_max = all_reduce_max_(local_max.detach().clone())
    q = torch.exp(scaled - global_max).t()  # (K, B)
    n_prototypes = q.shape[0]
    n_samples = all_reduce_sum_(torch.tensor(float(q.shape[1]), device=q.device))

    total = all_reduce_sum_(q.sum())
    q /= total
    for _ in range(n_iterations):
        row_sums = all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= row_sums
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


class SoftmaxCentering(nn.Module):
    """Softmax of centred, sharpened teacher logits, with a running-mean centre.

    The centre is a buffer, so it is saved with the loss module's state dict.

    Args:
        n_prototypes: K.
        momentum: weight of the old centre in the running mean.
    """

    def __init__(self, n_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Return softmax((logits - centre) / temperature) and update the centre with this batch.

        Args:
            logits: (B, K) teacher logits of this rank.
            temperature: teacher temperature.

        Returns:
            (B, K) float32 targets computed with the centre from before this batch.
        """
        logits = logits.float()
        targets = torch.softmax((logits - self.center) / temperature, dim=-1)
        batch_sum = all_reduce_sum_(logits.sum(dim=0, keepdim=True))
        count = all_reduce_sum_(torch.tensor(float(logits.shape[0]), device=logits.device))
        if count > 0:
            self.center.mul_(self.momentum).add_(batch_sum / count, alpha=1.0 - self.momentum)
        return targets


class CenteredTargetLoss(nn.Module):
    """Base of the DINO and iBOT losses: student temperature and teacher-target centring.

    Args:
        n_prototypes: K, the output dimension of the head.
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
        centering: str = "sinkhorn_knopp",
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
        """Turn (N, K) teacher logits into (N, K) targets; ``softmax`` also updates its centre."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return self.softmax_center(teacher_logits, teacher_temp)
