"""AdamW with layer-wise learning rates, and the warm-up plus cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from virchow.finetune.config import FinetuneConfig
from virchow.finetune.modes import TileClassifier, param_groups


class WarmupCosine:
    """Learning-rate factor per optimiser step: linear warm-up to 1, then cosine decay to ``min_ratio``.

    A class rather than a closure so that ``LambdaLR.state_dict`` stores its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(classifier: TileClassifier, config: FinetuneConfig) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """Return AdamW over the trainable parameters, each group at ``lr * lr_scale``, and those parameters."""
    groups = param_groups(classifier, config)
    lr = config.resolved_lr
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]} for g in groups],
        lr=lr,
        betas=(0.9, 0.999),
    )
    return optimizer, [p for g in groups for p in g["params"]]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int, int]:
    """Return the per-step schedule with its warm-up and total optimiser steps."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, config.min_lr_ratio))
    return scheduler, warmup_steps, total_steps
