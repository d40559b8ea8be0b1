"""ViT-S/14 and ViT-B/14 with Virchow's layers, for labs that pretrain with less compute.

They keep everything of the Virchow recipe except the size: packed SwiGLU MLP with SiLU, LayerScale
(init 1e-5), patch 14, no head, dynamic image size, ImageNet normalisation. The MLP ratio is
5.3334 so that the packed first layer is 2048 (ViT-S) or 4096 (ViT-B) wide, twice DINOv2's
SwiGLU hidden width for those sizes. Virchow's own ratio, 5.3375, would give odd widths (2049 and
4099) that the packed layer cannot split into halves. No official weights exist: train them with
``virchow pretrain`` or load a local export.
"""

from __future__ import annotations

from virchow.models.registry import VIRCHOW_MODEL_ARGS, ModelSpec, register_model

_SMALL_MLP_RATIO = 5.3334


@register_model
def _vit_s14_swiglu() -> ModelSpec:
    return ModelSpec(
        name="vit-s14-swiglu",
        architecture="vit_small_patch14_dinov2",
        model_args={
            **VIRCHOW_MODEL_ARGS,
            "patch_size": 14,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "mlp_ratio": _SMALL_MLP_RATIO,
        },
        hf_repo=None,
        embed_dim=384,
        license="none (no official weights)",
        tag="vit_s14_swiglu",
        description="ViT-S/14 (22M) with Virchow's SwiGLU and LayerScale; no official weights",
    )


@register_model
def _vit_b14_swiglu() -> ModelSpec:
    return ModelSpec(
        name="vit-b14-swiglu",
        architecture="vit_base_patch14_dinov2",
        model_args={
            **VIRCHOW_MODEL_ARGS,
            "patch_size": 14,
            "embed_dim": 768,
            "depth": 12,
            "num_heads": 12,
            "mlp_ratio": _SMALL_MLP_RATIO,
        },
        hf_repo=None,
        embed_dim=768,
        license="none (no official weights)",
        tag="vit_b14_swiglu",
        description="ViT-B/14 (86M) with Virchow's SwiGLU and LayerScale; no official weights",
    )
