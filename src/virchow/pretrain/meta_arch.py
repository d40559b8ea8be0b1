"""Student and teacher networks and the DINOv2 objective that ties them together.

Both networks are :class:`SSLNetwork`: a timm Virchow backbone, a DINO head for the class token,
an optional separate iBOT head for patch tokens, and a learnable mask token. The student encodes
all crops, with the masked patches of the global crops replaced by the mask token. The teacher
encodes the unmasked global crops and is an exponential moving average (EMA) of the student. Reference: Oquab
et al., "DINOv2: Learning Robust Visual Features without Supervision" (arXiv:2304.07193).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models._manipulate import checkpoint_seq
from torch import nn

from virchow.models import ModelSpec, build_model, get_model_spec, load_model
from virchow.pretrain.config import PretrainConfig
from virchow.pretrain.distributed import gather_with_grad
from virchow.pretrain.heads import DINOHead
from virchow.pretrain.losses import DINOLoss, IBOTPatchLoss, KDELoss, KoLeoLoss
from virchow.pretrain.losses.ibot import count_masked

_logger = logging.getLogger(__name__)


def backbone_tokens(
    backbone: nn.Module, images: torch.Tensor, masks: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
) -> torch.Tensor:
    """Run a timm VisionTransformer, replacing masked patch embeddings with ``mask_token``.

    The steps are those of timm's ``VisionTransformer.forward_features`` (timm 1.0), with the mask
    applied between the patch embedding and the position embedding, as iBOT and DINOv2 do.

    Args:
        backbone: timm VisionTransformer.
        images: (B, 3, H, W) normalised images; H and W multiples of the patch size.
        masks: (B, P) bool, True for patches to replace; None replaces nothing.
        mask_token: (D,) embedding put in place of masked patches.

    Returns:
        (B, prefix + P, D) final-normalised tokens: class token, registers, patches.
    """
    x = backbone.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, P, D)
    if masks is not None:
        assert mask_token is not None, "masks need a mask token"
        masked = masks.view(*x.shape[:-1], 1)
        x = torch.where(masked, mask_token.to(x.dtype), x)
    x = backbone._pos_embed(x)
    x = backbone.patch_drop(x)
    x = backbone.norm_pre(x)
    if backbone.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return backbone.norm(x)


@dataclass
class NetworkOutput:
    """Outputs of one network for a batch.

    Attributes:
        cls_tokens: (2B, D) final class tokens of the global crops (before any head).
        global_logits: (2B, K) DINO-head logits of the global crops.
        local_logits: (n_local * B, K) DINO-head logits of the local crops.
        patch_logits: (M, K') patch-head logits of the M masked positions, in ``masks.nonzero()`` order.
    """

    cls_tokens: torch.Tensor
    global_logits: torch.Tensor
    local_logits: torch.Tensor
    patch_logits: torch.Tensor


class SSLNetwork(nn.Module):
    """Backbone plus heads, used for both the student and the teacher.

    Args:
        backbone: timm VisionTransformer of a registered Virchow variant.
        spec: the variant (for the number of prefix tokens).
        cfg: the run configuration (head sizes, iBOT settings).
    """

    def __init__(self, backbone: nn.Module, spec: ModelSpec, cfg: PretrainConfig) -> None:
        super().__init__()
        width = spec.embed_dim
        self.num_prefix_tokens = spec.num_prefix_tokens
        self.backbone = backbone
        head = cfg.dino.head
        self.dino_head = DINOHead(
            width, head.n_prototypes, hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim, n_layers=head.n_layers
        )
        self.use_ibot = cfg.ibot.loss_weight > 0
        self.ibot_head: DINOHead | None = None
        if self.use_ibot and cfg.ibot.separate_head:
            head = cfg.ibot.head
            self.ibot_head = DINOHead(
                width, head.n_prototypes, hidden_dim=head.hidden_dim, bottleneck_dim=head.bottleneck_dim, n_layers=head.n_layers
            )
        # DINOv2 initialises the mask token with zeros.
        self.mask_token = nn.Parameter(torch.zeros(width))

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor, *, apply_mask: bool
    ) -> NetworkOutput:
        """Encode the crops and apply the heads.

        Args:
            global_crops: (2B, 3, G, G).
            local_crops: (n_local * B, 3, L, L); may have 0 rows.
            masks: (2B, P) bool iBOT masks of the global crops.
            apply_mask: replace masked patches by the mask token (student) or not (teacher).
        """
        tokens = backbone_tokens(self.backbone, global_crops, masks if apply_mask else None, self.mask_token)
        cls_tokens = tokens[:, 0]
        if self.use_ibot:
            masked_patches = tokens[:, self.num_prefix_tokens :][masks]
        else:
            masked_patches = tokens.new_zeros((0, tokens.shape[-1]))
        if local_crops.shape[0]:
            local_cls = backbone_tokens(self.backbone, local_crops)[:, 0]
        else:
            local_cls = tokens.new_zeros((0, tokens.shape[-1]))

        n_global, n_local = cls_tokens.shape[0], local_cls.shape[0]
        if self.ibot_head is None:
            # A shared head runs once on every token it scores, as DINOv2 does.
            logits = self.dino_head(torch.cat([cls_tokens, local_cls, masked_patches]))
            global_logits, local_logits, patch_logits = logits.split([n_global, n_local, masked_patches.shape[0]])
        else:
            logits = self.dino_head(torch.cat([cls_tokens, local_cls]))
            global_logits, local_logits = logits.split([n_global, n_local])
            patch_logits = self.ibot_head(masked_patches)
        return NetworkOutput(cls_tokens, global_logits, local_logits, patch_logits)


def build_backbone(cfg: PretrainConfig, *, drop_path_rate: float) -> tuple[nn.Module, ModelSpec]:
    """Build the backbone on the CPU, from scratch or with the configured weights loaded strictly."""
    spec = get_model_spec(cfg.model.name)
    backbone = build_model(spec, device="cpu", drop_path_rate=drop_path_rate)
    if cfg.model.weights != "scratch":
        weights = None if cfg.model.weights == "official" else cfg.model.weights
        loaded = load_model(cfg.model.name, weights, device="cpu")
        backbone.load_state_dict(loaded.model.state_dict(), strict=True)
        _logger.info("student and teacher start from %s (%s)", cfg.model.name, loaded.provenance.source)
        del loaded
    else:
        _logger.info("student and teacher start from a random %s initialisation", cfg.model.name)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone.train(), spec


def build_networks(cfg: PretrainConfig) -> tuple[SSLNetwork, SSLNetwork, ModelSpec]:
    """Build the student and a teacher with identical weights, both on the CPU.

    The caller seeds torch first, so every rank builds the same initial weights. The teacher has no
    drop path and no gradients.
    """
    backbone, spec = build_backbone(cfg, drop_path_rate=cfg.model.drop_path_rate)
    student = SSLNetwork(backbone, spec, cfg)
    teacher = copy.deepcopy(student)
    for module in teacher.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0  # timm DropPath
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher, spec


@dataclass
class StepOutput:
    """Losses and monitors of one training step.

    Attributes:
        loss: weighted total, the tensor to back-propagate.
        parts: unweighted components (``dino_local``, ``dino_global``, ``ibot``, the regulariser).
        teacher_cls_std: mean over dimensions of the batch standard deviation of the teacher's
            L2-normalised global class tokens; 0 means collapse.
        teacher_entropy: mean entropy (nats) of the teacher's class-token targets; log K means
            uniform targets and no learning signal, 0 means one-hot targets.
        n_masked: masked patches over all ranks.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    teacher_cls_std: torch.Tensor
    teacher_entropy: torch.Tensor
    n_masked: int


class SelfDistillation(nn.Module):
    """The DINOv2 objective: DINO on class tokens, iBOT on masked patches, and a uniformity regulariser.

    Args:
        cfg: the run configuration.
        n_local: local crops per image.
    """

    def __init__(self, cfg: PretrainConfig, n_local: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_local = n_local
        dino = cfg.dino
        self.dino_loss = DINOLoss(
            dino.head.n_prototypes,
            student_temp=dino.student_temp,
            centering=dino.centering,
            center_momentum=dino.center_momentum,
            sinkhorn_iterations=dino.sinkhorn_iterations,
        )
        ibot_prototypes = cfg.ibot.head.n_prototypes if cfg.ibot.separate_head else dino.head.n_prototypes
        self.ibot_loss = IBOTPatchLoss(
            ibot_prototypes,
            student_temp=dino.student_temp,
            centering=dino.centering,
            center_momentum=dino.center_momentum,
            sinkhorn_iterations=dino.sinkhorn_iterations,
        )
        kind = cfg.regularizer.kind
        self.regularizer: nn.Module | None = None
        if kind == "koleo":
            self.regularizer = KoLeoLoss()
        elif kind == "kde":
            self.regularizer = KDELoss(cfg.regularizer.kde_concentration)

    def forward(
        self,
        student: nn.Module,
        teacher: nn.Module,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor,
        masks: torch.Tensor,
        teacher_temp: float,
    ) -> StepOutput:
        """Compute the losses of one batch (crop-major order, see :class:`virchow.pretrain.data.Batch`)."""
        cfg = self.cfg
        use_ibot = cfg.ibot.loss_weight > 0

        # teacher targets
        with torch.no_grad():
            teacher_out = teacher(global_crops, local_crops[:0], masks, apply_mask=False)
            teacher_cls_targets = self.dino_loss.teacher_targets(teacher_out.global_logits, teacher_temp).chunk(2)
            n_masked = count_masked(masks) if use_ibot else 0
            patch_targets = None
            if n_masked > 0:
                patch_targets = self.ibot_loss.teacher_targets(teacher_out.patch_logits, teacher_temp)
            normalised = F.normalize(teacher_out.cls_tokens.float(), dim=-1)
            teacher_cls_std = normalised.std(dim=0).mean() if normalised.shape[0] > 1 else normalised.new_zeros(())
            targets = torch.cat(teacher_cls_targets)
            teacher_entropy = -(targets * targets.clamp_min(1e-30).log()).sum(dim=-1).mean()

        # student predictions
        student_out = student(global_crops, local_crops, masks, apply_mask=True)
        student_global = student_out.global_logits.chunk(2)

        # DINO: every local crop against both teacher crops, each global crop against the other one
        n_terms = 2 * self.n_local + 2
        parts: dict[str, torch.Tensor] = {}
        if self.n_local:
            parts["dino_local"] = self.dino_loss(student_out.local_logits.chunk(self.n_local), teacher_cls_targets) / n_terms
        parts["dino_global"] = self.dino_loss(student_global, teacher_cls_targets, skip_same_index=True) / n_terms
        total = cfg.dino.loss_weight * sum(parts.values())

        # iBOT on masked patches. Without any masked patch on any rank the term is a zero that still
        # uses the head, because every rank's autograd graph must contain the same parameters.
        if use_ibot:
            if patch_targets is not None:
                parts["ibot"] = self.ibot_loss(student_out.patch_logits, patch_targets, masks)
            else:
                parts["ibot"] = student_out.patch_logits.sum() * 0.0
            total = total + cfg.ibot.loss_weight * parts["ibot"]

        # uniformity regulariser, per global crop
        if self.regularizer is not None and cfg.regularizer.weight > 0:
            value = torch.zeros((), device=global_crops.device)
            for chunk in student_out.cls_tokens.chunk(2):
                features = gather_with_grad(chunk) if cfg.regularizer.scope == "global" else chunk
                value = value + self.regularizer(features)
            parts[cfg.regularizer.kind] = value
            total = total + cfg.regularizer.weight * value

        return StepOutput(
            loss=total, parts=parts, teacher_cls_std=teacher_cls_std, teacher_entropy=teacher_entropy, n_masked=n_masked
        )


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """Set every teacher parameter to momentum * teacher + (1 - momentum) * student.

    Both modules must list their parameters in the same order (the same class, wrapped the same way).
    """
    student_params = list(student.parameters())
    teacher_params = list(teacher.parameters())
    assert len(student_params) == len(teacher_params), "student and teacher parameters differ"
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
