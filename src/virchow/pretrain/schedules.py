"""Per-iteration schedules of the learning rate, weight decay, teacher momentum and temperature.

Every schedule is a pure function of the iteration number, so a resumed run needs only the
iteration to continue every schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from virchow.pretrain.config import PretrainConfig


@dataclass(frozen=True)
class CosineSchedule:
    """A linear warm-up from ``warmup_start`` to ``base``, then a cosine from ``base`` to ``final``.

    Attributes:
        base: value at the end of the warm-up.
        final: value at iteration ``total`` and after it.
        total: length of the whole schedule in iterations.
        warmup: warm-up iterations.
        warmup_start: value at the start of the warm-up.
    """

    base: float
    final: float
    total: int
    warmup: int = 0
    warmup_start: float = 0.0

    def __call__(self, iteration: int) -> float:
        """Return the value at ``iteration`` (0-based)."""
        if iteration < self.warmup:
            return self.warmup_start + (self.base - self.warmup_start) * iteration / self.warmup
        decay_length = self.total - self.warmup
        if decay_length <= 0 or iteration - self.warmup >= decay_length:
            return self.final
        progress = (iteration - self.warmup) / decay_length
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearWarmup:
    """Linear ramp from ``start`` to ``end`` over ``iterations``, then ``end``."""

    start: float
    end: float
    iterations: int

    def __call__(self, iteration: int) -> float:
        """Return the value at ``iteration`` (0-based)."""
        if iteration >= self.iterations:
            return self.end
        return self.start + (self.end - self.start) * iteration / self.iterations


@dataclass(frozen=True)
class FrozenPrefix:
    """``schedule`` with value 0 for the first ``freeze`` iterations and unchanged after them."""

    schedule: CosineSchedule
    freeze: int

    def __call__(self, iteration: int) -> float:
        """Return the value at ``iteration`` (0-based)."""
        return 0.0 if iteration < self.freeze else self.schedule(iteration)


@dataclass(frozen=True)
class Schedules:
    """All schedules of a run.

    Attributes:
        lr: learning rate of the parameter groups (before their multipliers).
        last_layer_lr: learning rate of the prototypes, 0 while they are frozen.
        weight_decay: weight decay (before the groups' multipliers).
        momentum: teacher EMA momentum.
        teacher_temp: teacher softmax temperature.
    """

    lr: CosineSchedule
    last_layer_lr: FrozenPrefix
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: LinearWarmup


def scaled_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """Return ``optim.lr`` scaled from a batch of 1024 images to ``global_batch`` by ``optim.lr_scaling``."""
    ratio = global_batch / 1024.0
    if cfg.optim.lr_scaling == "sqrt":
        return cfg.optim.lr * math.sqrt(ratio)
    if cfg.optim.lr_scaling == "linear":
        return cfg.optim.lr * ratio
    return cfg.optim.lr


def build_schedules(cfg: PretrainConfig, global_batch: int) -> Schedules:
    """Build every schedule for a run whose ranks together take ``global_batch`` images per iteration."""
    optim, teacher, total = cfg.optim, cfg.teacher, cfg.train.iterations
    peak = scaled_lr(cfg, global_batch)
    lr = CosineSchedule(base=peak, final=optim.min_lr, total=total, warmup=optim.warmup_iterations)
    return Schedules(
        lr=lr,
        last_layer_lr=FrozenPrefix(lr, optim.freeze_last_layer_iterations),
        weight_decay=CosineSchedule(base=optim.weight_decay, final=optim.weight_decay_end, total=total),
        momentum=CosineSchedule(base=teacher.momentum, final=teacher.momentum_end, total=total),
        teacher_temp=LinearWarmup(teacher.warmup_temp, teacher.temp, teacher.temp_warmup_iterations),
    )

