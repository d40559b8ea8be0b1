"""Score bags with one or more trained aggregators and save per-slide attention.

With several checkpoints (for example the folds of a cross-validation) the class probabilities
and the attention weights are averaged over them. Attention is stored per slide in
``attention/<slide_id>.h5`` with the tile coordinates, ready for ``virchow heatmap``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from virchow.downstream.mil.bags import IGNORE_INDEX, Bag
from virchow.downstream.mil.model import MILCheckpoint
from virchow.downstream.mil.train import to_input
from virchow.downstream.slide_features import read_slide_features
from virchow.errors import DataError, EmptyBagError
from virchow.io.h5 import atomic_h5, write_attrs

_logger = logging.getLogger(__name__)


@dataclass
class SlideAttention:
    """Attention of the tiles of one slide inside its bag.

    Attributes:
        slide_id: slide id.
        coords: (N, 2) level-0 top-left (x, y), or None when the feature file has none.
        attention: (N,) attention weights. The weights of a whole bag sum to 1.
        patch_size_level0: tile side in level-0 pixels, or None.
    """

    slide_id: str
    coords: np.ndarray | None
    attention: np.ndarray
    patch_size_level0: float | None


@dataclass
class BagPrediction:
    """Probabilities per label head and attention per slide of one bag."""

    bag: Bag
    proba: list[np.ndarray]
    slides: list[SlideAttention]


def load_checkpoints(paths: list[Path]) -> list[MILCheckpoint]:
    """Load checkpoints and check that they share labels, classes and feature size.

    Raises:
        DataError: if a file is unreadable or the checkpoints disagree.
    """
    if not paths:
        raise DataError("at least one checkpoint is needed")
    checkpoints = [MILCheckpoint.load(path) for path in paths]
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        if (checkpoint.label_cols, checkpoint.classes) != (first.label_cols, first.classes):
            raise DataError(
                f"{path} predicts {checkpoint.label_cols} {checkpoint.classes}, but {paths[0]} predicts {first.label_cols} {first.classes}"
            )
        if checkpoint.model.in_features != first.model.in_features:
            raise DataError(
                f"{path} expects {checkpoint.model.in_features} features, {paths[0]} expects {first.model.in_features}"
            )
    return checkpoints


@torch.no_grad()
def predict_bags(checkpoints: list[MILCheckpoint], bags: list[Bag], device: torch.device) -> Iterator[BagPrediction]:
    """Yield the prediction of every bag, averaged over ``checkpoints``, one bag at a time.

    Raises:
        DataError: if the feature size differs from the checkpoints'.
        EmptyBagError: if a bag has no tiles.
    """
    models = [checkpoint.build(device) for checkpoint in checkpoints]
    expected = checkpoints[0].model.in_features
    for bag in bags:
        slides = [read_slide_features(path) for path in bag.paths]
        features = np.concatenate([s.features for s in slides], axis=0)
        if features.shape[0] == 0:
            raise EmptyBagError(f"bag {bag.bag_id!r} (slides {list(bag.slide_ids)}) has no tiles")
        if features.shape[1] != expected:
            raise DataError(
                f"bag {bag.bag_id!r} has {features.shape[1]}-dim features, the checkpoints expect {expected}"
            )

        proba_sum: list[np.ndarray] = []
        attention_sum = np.zeros(features.shape[0])
        for model, checkpoint in zip(models, checkpoints, strict=True):
            output = model(to_input(features, checkpoint.standardizer, device))
            probs = [torch.softmax(logits.float(), dim=-1)[0].cpu().numpy() for logits in output.logits]
            proba_sum = probs if not proba_sum else [a + b for a, b in zip(proba_sum, probs, strict=True)]
            attention_sum += output.attention[0].float().cpu().numpy()

        attention = attention_sum / len(models)
        bounds = np.cumsum([0] + [s.features.shape[0] for s in slides])
        per_slide = [
            SlideAttention(s.slide_id, s.coords, attention[bounds[i] : bounds[i + 1]], s.patch_size_level0)
            for i, s in enumerate(slides)
        ]
        yield BagPrediction(bag, [p / len(models) for p in proba_sum], per_slide)


def write_attention(slide: SlideAttention, path: Path, attrs: dict) -> None:
    """Write one slide's attention, coordinates and tile size to an HDF5 file atomically."""
    with atomic_h5(path) as handle:
        handle.create_dataset("attention", data=slide.attention.astype(np.float32))
        if slide.coords is not None:
            handle.create_dataset("coords", data=slide.coords.astype(np.int64))
        write_attrs(handle, {**attrs, "slide_id": slide.slide_id, "patch_size_level0": slide.patch_size_level0})


def run_prediction(checkpoint_paths: list[Path], bags: list[Bag], out_dir: Path, device: torch.device) -> pd.DataFrame:
    """Score ``bags``, write ``scores.csv`` and ``attention/<slide_id>.h5`` into ``out_dir``.

    Returns:
        The scores table: bag id, slides, tile count, then per label the predicted class, the
        true class when the table had one, and one probability column per class.
    """
    checkpoints = load_checkpoints(checkpoint_paths)
    reference = checkpoints[0]
    attention_dir = out_dir / "attention"
    attention_dir.mkdir(parents=True, exist_ok=True)
    attrs = {"checkpoints": [str(p) for p in checkpoint_paths], "aggregator": reference.model.kind}

    rows = []
    for prediction in predict_bags(checkpoints, bags, device):
        bag = prediction.bag
        row: dict = {"bag_id": bag.bag_id, "slide_ids": ";".join(bag.slide_ids), "n_tiles": sum(bag.n_tiles)}
        for task, column in enumerate(reference.label_cols):
            classes = reference.classes[task]
            row[f"{column}_pred"] = classes[int(np.argmax(prediction.proba[task]))]
            if task < len(bag.labels):
                row[f"{column}_true"] = classes[bag.labels[task]] if bag.labels[task] != IGNORE_INDEX else ""
            for k, name in enumerate(classes):
                row[f"{column}_proba_{name}"] = float(prediction.proba[task][k])
        rows.append(row)
        for slide in prediction.slides:
            write_attention(slide, attention_dir / f"{slide.slide_id}.h5", {**attrs, "bag_id": bag.bag_id})
        _logger.info("scored bag %s (%d tiles)", bag.bag_id, row["n_tiles"])

    scores = pd.DataFrame(rows)
    scores.to_csv(out_dir / "scores.csv", index=False)
    _logger.info("wrote scores of %d bags to %s and attention to %s", len(rows), out_dir / "scores.csv", attention_dir)
    return scores
