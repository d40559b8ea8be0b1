"""The tile classifier, the four fine-tuning modes and the optimiser parameter groups.

Modes decide which parameters train:

- ``head``: only the linear classifier, while the backbone runs frozen and without autograd.
- ``last-N``: the last N transformer blocks, the final norm and the classifier.
- ``full``: every parameter.
- ``lora``: low-rank adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
  https://arxiv.org/abs/2106.09685) on each block's attention ``qkv`` and ``proj`` and MLP ``fc1``
  and ``fc2`` layers, injected with ``peft``, plus the classifier.

Unfrozen blocks get layer-wise learning-rate decay as in BEiT (Bao et al.,
https://arxiv.org/abs/2106.08254): block i of d is trained at ``lr * layer_decay ** (d - i)``, the
final norm and the classifier at ``lr``, and the patch embedding and tokens at ``lr * layer_decay ** (d + 1)``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from virchow.errors import ConfigError
from virchow.finetune.config import FinetuneConfig
from virchow.models import embedding_shape, pool_tokens
from virchow.models.registry import ModelSpec

_logger = logging.getLogger(__name__)

# Full-match pattern for peft: the attention and MLP projections inside the transformer blocks.
# A plain suffix list such as ["qkv", "proj", "fc1", "fc2"] would also match patch_embed.proj.
LORA_TARGET_MODULES = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
_ADAPTER = "default"
_BLOCK = re.compile(r"blocks\.(\d+)\.")
_EMBEDDING_PARAMS = ("cls_token", "reg_token", "pos_embed", "patch_embed")
_NO_DECAY_PARAMS = ("cls_token", "reg_token", "pos_embed")


class TileClassifier(nn.Module):
    """A Virchow backbone, token pooling and a linear classifier.

    Args:
        backbone: timm VisionTransformer returning (B, T, D) tokens.
        spec: the backbone's variant.
        embedding: pooling of the tokens (``cls+mean``, ``cls`` or ``mean``).
        num_classes: classifier outputs.
        frozen_backbone: run the backbone in eval mode without autograd (``head`` mode).
    """

    def __init__(
        self, backbone: nn.Module, spec: ModelSpec, embedding: str, num_classes: int, *, frozen_backbone: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.embedding = embedding
        self.frozen_backbone = frozen_backbone
        (features,) = embedding_shape(embedding, spec.embed_dim, spec.num_patch_tokens)
        self.head = nn.Linear(features, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the pooled float32 (B, F) embedding of normalised (B, 3, H, W) images."""
        if self.frozen_backbone:
            with torch.no_grad():
                tokens = self.backbone(images)
        else:
            tokens = self.backbone(images)
        return pool_tokens(tokens.float(), self.embedding, self.spec.num_prefix_tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return (B, num_classes) logits."""
        return self.head(self.embed(images))

    def train(self, mode: bool = True) -> TileClassifier:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self


def apply_mode(classifier: TileClassifier, config: FinetuneConfig) -> None:
    """Freeze parameters, or inject LoRA adapters, as ``config.mode`` requests. The head always trains.

    Raises:
        ConfigError: ``last-N`` requests more blocks than the backbone has.
    """
    backbone = classifier.backbone
    kind, unfrozen = config.mode_kind, config.unfrozen_blocks
    depth = len(backbone.blocks)

    if kind == "lora":
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=LORA_TARGET_MODULES,
            bias="none",
        )
        # inject_adapter_in_model keeps the timm class (so set_grad_checkpointing still works) and
        # freezes every parameter that is not an adapter.
        inject_adapter_in_model(lora, backbone, adapter_name=_ADAPTER)
    else:
        backbone.requires_grad_(kind == "full")
        if kind == "last-N":
            if unfrozen > depth:
                raise ConfigError(f"mode {config.mode} requests {unfrozen} blocks but {config.model} has {depth}")
            for block in backbone.blocks[depth - unfrozen :]:
                block.requires_grad_(True)
            backbone.norm.requires_grad_(True)
    classifier.head.requires_grad_(True)
    classifier.frozen_backbone = kind == "head"

    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    total = sum(p.numel() for p in classifier.parameters())
    _logger.info("mode %s: %d of %d parameters trainable (%.3f%%)", config.mode, trainable, total, 100 * trainable / total)


def layer_id(name: str, depth: int) -> int:
    """Return the depth of a backbone parameter: 0 for embeddings, i + 1 for block i, depth + 1 above."""
    if name.startswith(_EMBEDDING_PARAMS):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def param_groups(classifier: TileClassifier, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Group trainable parameters by learning-rate scale and weight decay for AdamW.

    Weight decay is skipped for 1-D parameters (biases, norms, LayerScale) and for the class and
    register tokens and position embedding. Each group carries ``lr_scale``, which the
    learning-rate schedule multiplies in.
    """
    depth = len(classifier.backbone.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    named = [(f"backbone.{n}", n, p) for n, p in classifier.backbone.named_parameters()]
    named += [(f"head.{n}", None, p) for n, p in classifier.head.named_parameters()]
    for full_name, backbone_name, param in named:
        if not param.requires_grad:
            continue
        level = layer_id(backbone_name, depth) if backbone_name is not None else depth + 1
        no_decay = param.ndim <= 1 or (backbone_name or "").startswith(_NO_DECAY_PARAMS)
        key = (level, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else config.weight_decay,
                "lr_scale": config.layer_decay ** (depth + 1 - level),
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(full_name)
    return [groups[key] for key in sorted(groups)]


def trainable_state_dict(classifier: TileClassifier) -> dict[str, torch.Tensor]:
    """Return CPU copies of the trainable parameters by name, which is all that checkpoints store."""
    return {name: param.detach().to("cpu", copy=True) for name, param in classifier.named_parameters() if param.requires_grad}


def load_trainable_state_dict(classifier: TileClassifier, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state_dict` into the classifier.

    Raises:
        ConfigError: the names differ from the classifier's trainable parameters, which means the
            checkpoint comes from another mode or model.
    """
    params = {name: param for name, param in classifier.named_parameters() if param.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint does not match the trainable parameters of this run: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, so it was written with another mode or model"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def merged_backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Return the backbone's state dict with any LoRA update merged into the base weights.

    The result has the keys of the plain timm model (``blocks.0.attn.qkv.weight``), so it loads
    strictly into a model built with :func:`virchow.models.build_model`. The backbone itself is
    not changed, unlike peft's ``merge_and_unload``.
    """
    merged: dict[str, torch.Tensor] = {}
    for name, module in backbone.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            prefix = f"{name}." if name else ""
            delta = module.get_delta_weight(_ADAPTER) if _ADAPTER in module.lora_A else 0.0
            merged[f"{prefix}weight"] = (base.weight.detach() + delta).detach()
            if base.bias is not None:
                merged[f"{prefix}bias"] = base.bias.detach()
    for key, value in backbone.state_dict().items():
        if ".lora_" in key or ".base_layer." in key:
            continue
        merged[key] = value.detach()
    return merged
