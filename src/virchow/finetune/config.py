"""Settings of a fine-tuning run, validated when they are created."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from virchow.errors import ConfigError
from virchow.models.pooling import EMBEDDING_KINDS

Monitor = Literal["balanced_accuracy", "accuracy", "macro_f1", "loss"]
ColorJitter = Literal["hed", "hsv", "none"]
ClassWeights = Literal["none", "balanced"]

MODES = ("head", "last-N", "full", "lora")
MONITORS: tuple[str, ...] = get_args(Monitor)
COLOR_JITTERS: tuple[str, ...] = get_args(ColorJitter)
CLASS_WEIGHTS: tuple[str, ...] = get_args(ClassWeights)

# Learning rates used when --lr is not given. They are common starting points for each mode
# (a linear probe tolerates a large rate, full fine-tuning of a ViT-H needs a small one), not
# values tuned on Virchow.
DEFAULT_LR = {"head": 1e-3, "lora": 3e-4, "last-N": 1e-4, "full": 3e-5}

# Fields that may differ between an interrupted run and its resumption. All but ``device`` leave the
# result unchanged, and another device type changes only the floating-point rounding.
RUNTIME_FIELDS = ("resume", "stop_after_epoch", "num_workers", "progress", "export", "device")

_LAST_N = re.compile(r"last-(\d+)")


def parse_mode(mode: str) -> tuple[str, int]:
    """Split a mode into its kind and the number of unfrozen blocks (``last-4`` -> ``("last-N", 4)``).

    Raises:
        ConfigError: ``mode`` is not ``head``, ``full``, ``lora`` or ``last-N`` with N at least 1.
    """
    if mode in ("head", "full", "lora"):
        return mode, 0
    match = _LAST_N.fullmatch(mode)
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"invalid mode {mode!r}: use head, full, lora, or last-N with N >= 1 blocks, as in last-4")
    return "last-N", int(match.group(1))


@dataclass
class FinetuneConfig:
    """Settings that define a fine-tuning run, saved with every checkpoint.

    Attributes:
        data: training tiles, an ImageFolder directory (one subfolder per class) or a CSV file.
        out_dir: run directory for checkpoints, logs, metrics and the exported model.
        val_data: validation tiles in the same form. None draws a split from ``data`` or uses
            ``split_col``.
        root: folder that relative CSV paths are resolved against. None means the CSV's folder.
        path_col: CSV column with image paths.
        label_col: CSV column with class labels.
        group_col: CSV column with patient ids. A drawn split keeps each patient in one part.
        split_col: CSV column with ``train``/``val``/``test`` per row (``test`` rows are ignored).
        val_fraction: share of the samples (or patients) drawn for validation. 0 trains without one.
        model: registry name of the backbone.
        weights: backbone weights, in any form :func:`virchow.models.load_model` accepts.
        embedding: token pooling fed to the linear head (``cls+mean``, ``cls`` or ``mean``).
        mode: ``head``, ``last-N`` (for example ``last-4``), ``full`` or ``lora``.
        lora_rank: rank r of the LoRA matrices.
        lora_alpha: LoRA scaling numerator. The update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA input.
        epochs: passes over the training set.
        batch_size: global batch per optimiser step, over all processes and accumulation steps.
        accumulation_steps: micro-batches whose gradients are summed before each optimiser step.
        lr: peak learning rate of the head. None takes the mode's default from ``DEFAULT_LR``.
        layer_decay: learning-rate factor per block below the head (1.0 disables the decay).
        weight_decay: AdamW weight decay, not applied to biases, norms, tokens and LayerScale.
        warmup_epochs: linear warm-up length before the cosine decay, in epochs.
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of the peak.
        max_grad_norm: gradient clipping threshold. None disables clipping.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast (fp16 uses a gradient scaler).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        class_weights: ``balanced`` weights each class by n / (k * n_class) in the loss.
        monitor: validation metric for early stopping and the best checkpoint.
        patience: epochs without improvement before stopping. 0 disables early stopping.
        augment: apply flips, 90-degree rotations, colour jitter and blur to training tiles.
        color_jitter: ``hed`` (stain space), ``hsv`` or ``none``.
        color_strength: range of the colour jitter (see :mod:`virchow.finetune.augment`).
        blur_prob: probability of a mild Gaussian blur per tile.
        seed: seed of the split, the shuffling, the augmentations and the head initialisation.
        num_workers: DataLoader worker processes per training process.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Under torchrun each process
            takes ``cuda:LOCAL_RANK``.
        resume: continue from ``out_dir/last.pt``.
        stop_after_epoch: end this invocation after that epoch, leaving a checkpoint to resume.
        export: write the backbone and head to ``out_dir/export`` at the end.
        progress: show a progress bar per epoch.
    """

    data: str
    out_dir: str
    val_data: str | None = None
    root: str | None = None
    path_col: str = "path"
    label_col: str = "label"
    group_col: str | None = None
    split_col: str | None = None
    val_fraction: float = 0.2
    model: str = "virchow"
    weights: str | None = None
    embedding: str = "cls+mean"
    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    epochs: int = 10
    batch_size: int = 32
    accumulation_steps: int = 1
    lr: float | None = None
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = None
    precision: str = "auto"
    grad_checkpointing: bool = False
    class_weights: ClassWeights = "none"
    monitor: Monitor = "balanced_accuracy"
    patience: int = 5
    augment: bool = True
    color_jitter: ColorJitter = "hed"
    color_strength: float = 0.05
    blur_prob: float = 0.2
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    resume: bool = False
    stop_after_epoch: int | None = None
    export: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        # Absolute paths make a resumed run comparable with the original from any working directory.
        self.data = _absolute(self.data)
        self.out_dir = _absolute(self.out_dir)
        self.val_data = _absolute(self.val_data) if self.val_data is not None else None
        self.root = _absolute(self.root) if self.root is not None else None

        # closed sets of values
        parse_mode(self.mode)
        if self.embedding not in EMBEDDING_KINDS or self.embedding == "patch_tokens":
            raise ConfigError(f"invalid embedding {self.embedding!r} for a linear head: use cls+mean, cls or mean")
        _check_choice("monitor", self.monitor, MONITORS)
        _check_choice("color_jitter", self.color_jitter, COLOR_JITTERS)
        _check_choice("class_weights", self.class_weights, CLASS_WEIGHTS)

        # numeric ranges
        for name in ("epochs", "batch_size", "accumulation_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ConfigError(f"blur_prob must be in [0, 1], got {self.blur_prob}")
        if not 0.0 <= self.color_strength < 0.5:
            raise ConfigError(f"color_strength must be in [0, 0.5), got {self.color_strength}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.lora_dropout < 0:
            raise ConfigError("warmup_epochs, weight_decay and lora_dropout must not be negative")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 1:
            raise ConfigError(f"stop_after_epoch must be at least 1, got {self.stop_after_epoch}")

        if self.val_data is not None and self.split_col is not None:
            raise ConfigError("give either val_data or split_col for the validation split, not both")

    @property
    def mode_kind(self) -> str:
        """``head``, ``last-N``, ``full`` or ``lora``."""
        return parse_mode(self.mode)[0]

    @property
    def unfrozen_blocks(self) -> int:
        """Number of trainable final blocks in ``last-N`` mode, 0 otherwise."""
        return parse_mode(self.mode)[1]

    @property
    def resolved_lr(self) -> float:
        """Peak learning rate of the head: ``lr`` or the mode's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode_kind]

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-safe values, with the learning rate resolved."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["lr"] = self.resolved_lr
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FinetuneConfig:
        """Rebuild a config saved by :meth:`to_dict`, ignoring unknown keys from other versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def differences(self, other: FinetuneConfig) -> list[str]:
        """List the settings that change training results between ``self`` and ``other``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            f"{key}: {theirs.get(key)!r} -> {mine[key]!r}"
            for key in mine
            if key not in RUNTIME_FIELDS and mine[key] != theirs.get(key)
        ]


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"invalid {name} {value!r}, valid values are {', '.join(allowed)}")
