"""AdamW parameter groups with layer-wise learning-rate decay, and per-iteration schedule updates.

Each parameter gets a learning-rate multiplier, a weight-decay multiplier and a flag for the
prototypes; parameters with equal values share a group. The rules follow DINOv2's
``get_params_groups_with_decay``, except that position embeddings and class and register tokens
get no weight decay, as timm's ``no_weight_decay`` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from virchow.pretrain.config import PretrainConfig
from virchow.pretrain.schedules import Schedules

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "cls_token", "reg_token", "mask_token")


def layer_id(name: str, depth: int) -> int:
    """Return the depth position of a parameter: 0 for embeddings, i + 1 for block i, depth + 1 otherwise."""
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    match = _BLOCK.search(name)
    if match and name.startswith("backbone."):
        return int(match.group(1)) + 1
    return depth + 1


def clean_name(name: str) -> str:
    """Strip the prefixes that DDP, FSDP and torch.compile add to parameter names."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def parameter_multipliers(name: str, cfg: PretrainConfig, depth: int) -> tuple[float, float, bool]:
    """Return (lr multiplier, weight-decay multiplier, is prototype) of a student parameter.

    Args:
        name: parameter name inside :class:`virchow.pretrain.meta_arch.SSLNetwork`, without wrapper prefixes.
        cfg: the run configuration.
        depth: number of backbone blocks.
    """
    lr_mult = 1.0
    if name.startswith("backbone.") or name == "mask_token":
        lr_mult = cfg.optim.layerwise_decay ** (depth + 1 - layer_id(name, depth))
    if "patch_embed" in name:
        lr_mult *= cfg.optim.patch_embed_lr_mult
    no_decay = (
        name.endswith(".bias")
        or "norm" in name
        or name.endswith(".gamma")  # LayerScale
        or any(token in name for token in ("pos_embed", "cls_token", "reg_token", "mask_token"))
    )
    return lr_mult, 0.0 if no_decay else 1.0, name.endswith("prototypes")


def build_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: PretrainConfig, depth: int) -> list[dict]:
    """Group trainable parameters by their multipliers, in first-seen order."""
    groups: dict[tuple[float, float, bool], dict] = {}
    for raw_name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        name = clean_name(raw_name)
        key = parameter_multipliers(name, cfg, depth)
        if key not in groups:
            lr_mult, wd_mult, is_prototypes = key
            groups[key] = {
                "params": [],
                "names": [],
                "lr_multiplier": lr_mult,
                "wd_multiplier": wd_mult,
                "is_prototypes": is_prototypes,
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: PretrainConfig, depth: int) -> torch.optim.AdamW:
    """Create AdamW over the grouped parameters; learning rates are set every iteration by :func:`apply_schedules`."""
    groups = build_param_groups(named_parameters, cfg, depth)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), weight_decay=0.0)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, iteration: int) -> tuple[float, float]:
    """Set every group's learning rate and weight decay for ``iteration``; return (lr, weight decay)."""
    lr = schedules.lr(iteration)
    last_layer_lr = schedules.last_layer_lr(iteration)
    weight_decay = schedules.weight_decay(iteration)
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_prototypes"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
    return lr, weight_decay
