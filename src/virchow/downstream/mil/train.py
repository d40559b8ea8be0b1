"""Fit one aggregator bag by bag with early stopping, and score bags with a fitted one.

By default each optimiser step uses one bag, so bags of any size (1 to 100k+ tiles) need no
padding and memory grows linearly with the largest bag. With ``batch_size > 1`` several bags are
padded to the longest one, and the padded tiles are masked out of the attention softmax. Combine
it with ``train_bag_size`` to bound the padded size. The loss is the class-weighted cross-entropy
summed over label heads (missing labels ignored) and averaged over the bags of a step.

Runs are deterministic for a given seed on the CPU. The torch generator is seeded inside
``torch.random.fork_rng`` and deterministic algorithms are switched on for the duration of the fit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from virchow.downstream.mil.bags import IGNORE_INDEX, Bag, BagStore
from virchow.downstream.mil.model import MILModelConfig, Standardizer, build_model
from virchow.errors import ConfigError, DataError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one fit.

    Attributes:
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        max_epochs: upper bound on passes over the training bags.
        patience: epochs without a lower validation loss before stopping.
        class_weight: ``balanced`` weights class c by n / (K * n_c) on the training bags, and ``none`` weights every class 1.
        train_bag_size: tiles sampled (without replacement) from larger bags at each training step;
            None uses every tile. Validation and prediction always use every tile.
        batch_size: bags per optimiser step, padded to the longest bag of the step.
        standardize: fit per-feature mean and std on the training tiles and apply them everywhere.
        device: torch device string, for example ``cpu`` or ``cuda:0``.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-2
    max_epochs: int = 50
    patience: int = 10
    class_weight: Literal["balanced", "none"] = "balanced"
    train_bag_size: int | None = None
    batch_size: int = 1
    standardize: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be positive and weight_decay non-negative, got {self.lr}, {self.weight_decay}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError(f"max_epochs and patience must be at least 1, got {self.max_epochs}, {self.patience}")
        if self.class_weight not in ("balanced", "none"):
            raise ConfigError(f"class_weight must be 'balanced' or 'none', got {self.class_weight!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.train_bag_size is not None and self.train_bag_size < 1:
            raise ConfigError(f"train_bag_size must be at least 1, got {self.train_bag_size}")

    def to_dict(self) -> dict:
        """Return a JSON-able dict."""
        return asdict(self)


@dataclass
class FitResult:
    """A fitted aggregator and its training curve.

    Attributes:
        state_dict: weights of the epoch with the lowest validation loss (CPU tensors).
        best_epoch: that epoch, 1-based.
        best_val_loss: its validation loss.
        history: one dict per epoch with ``epoch``, ``train_loss`` and ``val_loss``.
        standardizer: the fitted standardisation, or None.
        class_weights: per head, the class weights used in the loss.
    """

    state_dict: dict[str, Tensor]
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    standardizer: Standardizer | None = None
    class_weights: list[list[float]] = field(default_factory=list)


@contextlib.contextmanager
def deterministic_run(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and enable deterministic algorithms on the CPU, restoring the global state after.

    NOTE: the tests cover the CPU only. On CUDA the generators are seeded too, but the kernels are
    not forced to be deterministic, so repeated GPU runs can differ slightly.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def class_weights(bags: list[Bag], n_classes: tuple[int, ...], mode: str) -> list[Tensor]:
    """Return per-head class weights. ``balanced`` gives n / (K * n_c), so the mean weight per bag is 1."""
    weights = []
    for task, k in enumerate(n_classes):
        labels = np.array([bag.labels[task] for bag in bags])
        labels = labels[labels != IGNORE_INDEX]
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        if mode == "none" or labels.size == 0:
            weights.append(torch.ones(k))
            continue
        present = counts > 0
        w = np.zeros(k)
        w[present] = labels.size / (present.sum() * counts[present])
        weights.append(torch.tensor(w, dtype=torch.float32))
    return weights


def per_bag_loss(logits: list[Tensor], labels: Tensor, weights: list[Tensor]) -> Tensor:
    """Class-weighted cross-entropy of each bag, summed over label heads. Missing labels add 0.

    Args:
        logits: per head, (B, K_t) logits.
        labels: (B, T) class indices, ``IGNORE_INDEX`` where missing.
        weights: per head, (K_t,) class weights.

    Returns:
        (B,) losses.
    """
    total = logits[0].new_zeros(labels.shape[0])
    for task, (head_logits, w) in enumerate(zip(logits, weights, strict=True)):
        # reduction="none" keeps each bag's class weight, while "mean" would divide it back out.
        total = total + nn.functional.cross_entropy(
            head_logits, labels[:, task], weight=w.to(head_logits.device), ignore_index=IGNORE_INDEX, reduction="none"
        )
    return total


def pad_bags(
    bags: list[np.ndarray], standardizer: Standardizer | None, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Stack (N_i, D) bags into a (B, max N_i, D) tensor and a padding mask (None for one bag)."""
    if len(bags) == 1:
        return to_input(bags[0], standardizer, device), None
    longest = max(b.shape[0] for b in bags)
    x = torch.zeros(len(bags), longest, bags[0].shape[1], device=device)
    mask = torch.ones(len(bags), longest, dtype=torch.bool, device=device)
    for i, bag in enumerate(bags):
        x[i, : bag.shape[0]] = to_input(bag, standardizer, device)[0]
        mask[i, : bag.shape[0]] = False
    return x, mask


def to_input(features: np.ndarray, standardizer: Standardizer | None, device: torch.device) -> Tensor:
    """Turn (N, D) numpy features into a standardised (1, N, D) float32 tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    if standardizer is not None:
        x = standardizer(x)
    return x.unsqueeze(0)


def fit_model(
    model_config: MILModelConfig,
    config: TrainConfig,
    store: BagStore,
    train_bags: list[Bag],
    val_bags: list[Bag],
    *,
    seed: int,
    tag: str = "",
) -> FitResult:
    """Train an aggregator on ``train_bags``, stopping early on the loss of ``val_bags``.

    Args:
        model_config: architecture.
        config: optimisation settings.
        store: feature loader.
        train_bags: bags the weights are fitted on (bags without any label are skipped).
        val_bags: bags whose loss selects the epoch and triggers early stopping.
        seed: seed of initialisation, dropout, bag order and tile sampling.
        tag: prefix of the log lines, for example ``seed 0 fold 2``.

    Returns:
        The weights of the best epoch and the training curve.
    """
    device = torch.device(config.device)
    train_bags = [b for b in train_bags if any(label != IGNORE_INDEX for label in b.labels)]
    standardizer = Standardizer.fit(store, train_bags) if config.standardize else None
    weights = class_weights(train_bags, model_config.n_classes, config.class_weight)
    rng = np.random.default_rng(seed)

    with deterministic_run(seed, device):
        model = build_model(model_config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        best_state, best_epoch, best_loss = copy.deepcopy(model.state_dict()), 0, float("inf")
        history = []
        stale_epochs = 0

        for epoch in range(1, config.max_epochs + 1):
            # one pass over the training bags in a seeded order
            model.train()
            train_losses = []
            order = rng.permutation(len(train_bags))
            for start in range(0, len(order), config.batch_size):
                batch = [train_bags[i] for i in order[start : start + config.batch_size]]
                x, mask = pad_bags(
                    [_sample_tiles(store.features(b), config.train_bag_size, rng) for b in batch], standardizer, device
                )
                labels = torch.tensor([b.labels for b in batch], device=device)
                loss = per_bag_loss(model(x, mask).logits, labels, weights).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                train_losses.append(loss.item())

            # validation loss decides the best epoch and early stopping
            val_loss = evaluate_loss(model, store, val_bags, weights, standardizer, device, config.batch_size)
            if np.isnan(val_loss):
                raise DataError(f"{tag}: no validation bag has a label, so early stopping has nothing to monitor")
            history.append({"epoch": epoch, "train_loss": float(np.mean(train_losses)), "val_loss": val_loss})
            _logger.debug(
                "%s epoch %d: train loss %.4f, val loss %.4f", tag, epoch, history[-1]["train_loss"], val_loss
            )
            if val_loss < best_loss:
                best_state, best_epoch, best_loss = copy.deepcopy(model.state_dict()), epoch, val_loss
                stale_epochs = 0
            else:
                stale_epochs += 1
                if stale_epochs >= config.patience:
                    break

    _logger.info("%s stopped after %d epochs. Best epoch %d, val loss %.4f", tag, len(history), best_epoch, best_loss)
    state = {name: tensor.detach().cpu() for name, tensor in best_state.items()}
    return FitResult(state, best_epoch, best_loss, history, standardizer, [w.tolist() for w in weights])


def _sample_tiles(features: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    if size is None or features.shape[0] <= size:
        return features
    return features[np.sort(rng.choice(features.shape[0], size=size, replace=False))]


def _chunks(bags: list[Bag], size: int) -> Iterator[list[Bag]]:
    for start in range(0, len(bags), size):
        yield bags[start : start + size]


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    store: BagStore,
    bags: list[Bag],
    weights: list[Tensor],
    standardizer: Standardizer | None,
    device: torch.device,
    batch_size: int = 1,
) -> float:
    """Mean class-weighted loss over the bags with at least one label, or NaN when there are none."""
    model.eval()
    total, count = 0.0, 0
    for batch in _chunks(bags, batch_size):
        x, mask = pad_bags([store.features(b) for b in batch], standardizer, device)
        labels = torch.tensor([b.labels for b in batch], device=device)
        labelled = (labels != IGNORE_INDEX).any(dim=1)
        total += float(per_bag_loss(model(x, mask).logits, labels, weights)[labelled].sum())
        count += int(labelled.sum())
    return total / count if count else float("nan")


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    store: BagStore,
    bags: list[Bag],
    standardizer: Standardizer | None,
    device: torch.device,
    batch_size: int = 1,
) -> list[np.ndarray]:
    """Return, per head, the (B, K) softmax probabilities of ``bags``."""
    model.eval()
    per_head: list[list[np.ndarray]] = []
    for batch in _chunks(bags, batch_size):
        x, mask = pad_bags([store.features(b) for b in batch], standardizer, device)
        logits = model(x, mask).logits
        if not per_head:
            per_head = [[] for _ in logits]
        for task, head_logits in enumerate(logits):
            per_head[task].append(torch.softmax(head_logits.float(), dim=-1).cpu().numpy())
    return [np.concatenate(rows) for rows in per_head]
