"""Aggregator configuration, construction, feature standardisation and checkpoint files."""

from __future__ import annotations

import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from virchow import __version__
from virchow.downstream.mil.abmil import GatedABMIL
from virchow.downstream.mil.agata import Agata
from virchow.downstream.mil.bags import Bag, BagStore
from virchow.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)

AGGREGATORS = ("abmil", "agata")
CHECKPOINT_FORMAT = "virchow-mil"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class MILModelConfig:
    """Architecture of an aggregator.

    Attributes:
        kind: ``abmil`` (gated attention) or ``agata``.
        in_features: tile embedding size F.
        n_classes: classes per label head.
        hidden_dim: ABMIL projection size, or Agata key and value size.
        attention_dim: ABMIL attention branch size (unused by Agata).
        dropout: dropout rate (ABMIL projection and bag embedding, Agata bag embedding).
        n_queries: Agata learned queries.
        activation: Agata activation, ``relu`` or ``gelu``.
        scaled_attention: Agata divides scores by sqrt(hidden_dim).
    """

    kind: Literal["abmil", "agata"]
    in_features: int
    n_classes: tuple[int, ...]
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.25
    n_queries: int = 1
    activation: Literal["relu", "gelu"] = "relu"
    scaled_attention: bool = False

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise ConfigError(f"unknown aggregator {self.kind!r}. Choose from {list(AGGREGATORS)}")
        if not self.n_classes or min(self.n_classes) < 2:
            raise ConfigError(f"every label head needs at least 2 classes, got {list(self.n_classes)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples as lists)."""
        config = asdict(self)
        config["n_classes"] = list(self.n_classes)
        return config

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MILModelConfig:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**{**config, "n_classes": tuple(config["n_classes"])})


def build_model(config: MILModelConfig) -> nn.Module:
    """Instantiate the aggregator that ``config`` describes."""
    if config.kind == "abmil":
        return GatedABMIL(
            config.in_features,
            config.n_classes,
            hidden_dim=config.hidden_dim,
            attention_dim=config.attention_dim,
            dropout=config.dropout,
        )
    return Agata(
        config.in_features,
        config.n_classes,
        key_dim=config.hidden_dim,
        value_dim=config.hidden_dim,
        n_queries=config.n_queries,
        activation=config.activation,
        scaled_attention=config.scaled_attention,
        dropout=config.dropout,
    )


@dataclass
class Standardizer:
    """Per-feature mean and standard deviation fitted on training tiles.

    Attributes:
        mean: (D,) float32 mean.
        std: (D,) float32 standard deviation, floored at ``1e-6`` so constant features stay finite.
    """

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, store: BagStore, bags: list[Bag]) -> Standardizer:
        """Compute mean and std over every tile of ``bags`` in float64, one bag at a time."""
        total = sum_sq = None
        count = 0
        for bag in bags:
            x = store.features(bag).astype(np.float64)
            total = x.sum(axis=0) if total is None else total + x.sum(axis=0)
            sum_sq = (x * x).sum(axis=0) if sum_sq is None else sum_sq + (x * x).sum(axis=0)
            count += x.shape[0]
        if total is None or count == 0:
            raise DataError("cannot standardise features: the training bags have no tiles")
        mean = total / count
        std = np.sqrt(np.maximum(sum_sq / count - mean * mean, 0.0))
        return cls(
            torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(np.maximum(std, 1e-6).astype(np.float32))
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Standardise (..., D) features."""
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def to_dict(self) -> dict[str, Tensor]:
        """Return the tensors for a checkpoint."""
        return {"mean": self.mean, "std": self.std}


@dataclass
class MILCheckpoint:
    """Everything needed to rebuild a trained aggregator and apply it to new bags.

    Attributes:
        model: architecture.
        state_dict: trained weights.
        label_cols: label column names, one per head.
        classes: class names per head.
        standardizer: feature standardisation fitted on the training tiles, or None.
        settings: resolved training and data settings (JSON-able).
        bags: bag ids per split (``train``, ``val``, ``test``) used for this model.
    """

    model: MILModelConfig
    state_dict: dict[str, Tensor]
    label_cols: list[str]
    classes: list[list[str]]
    standardizer: Standardizer | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    bags: dict[str, list[str]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write the checkpoint with ``torch.save`` (only tensors and plain Python values)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "virchow_version": __version__,
            "model": self.model.to_dict(),
            "state_dict": self.state_dict,
            "label_cols": self.label_cols,
            "classes": self.classes,
            "standardizer": self.standardizer.to_dict() if self.standardizer else None,
            "settings": self.settings,
            "bags": self.bags,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> MILCheckpoint:
        """Read a checkpoint written by :meth:`save` (``weights_only=True``, CPU map location).

        Raises:
            DataError: if the file is missing, unreadable or not a virchow MIL checkpoint.
        """
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise DataError(f"checkpoint not found: {path}") from exc
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise DataError(f"cannot read checkpoint {path}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise DataError(f"{path} is not a checkpoint written by 'virchow train-mil'")
        if payload.get("format_version", 0) > CHECKPOINT_VERSION:
            raise DataError(f"{path} has checkpoint format {payload['format_version']}. Upgrade virchow to read it")
        standardizer = payload.get("standardizer")
        return cls(
            model=MILModelConfig.from_dict(payload["model"]),
            state_dict=payload["state_dict"],
            label_cols=list(payload["label_cols"]),
            classes=[list(c) for c in payload["classes"]],
            standardizer=Standardizer(standardizer["mean"], standardizer["std"]) if standardizer else None,
            settings=payload.get("settings", {}),
            bags=payload.get("bags", {}),
        )

    def build(self, device: torch.device) -> nn.Module:
        """Instantiate the aggregator with the trained weights, in eval mode on ``device``."""
        model = build_model(self.model)
        model.load_state_dict(self.state_dict, strict=True)
        return model.to(device).eval()
