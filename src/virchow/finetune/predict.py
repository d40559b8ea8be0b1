"""Score tile images with an exported backbone and classifier head and write the results as CSV."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from virchow.embed.embedder import Embedder
from virchow.embed.tiles import ImageFileDataset, find_images, keep_items
from virchow.errors import ConfigError
from virchow.finetune.export import ClassifierHead
from virchow.preprocess import IMAGE_SUFFIXES, OfficialTransform

_logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """Outcome of :func:`predict_tiles`.

    Attributes:
        out: the CSV file written.
        n_predicted: images scored.
        failed: (relative path, reason) of each image that could not be read.
        seconds: wall time.
    """

    out: Path
    n_predicted: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def probability_columns(classes: Sequence[str]) -> list[str]:
    """Return the CSV column names of the class probabilities, ``prob_<class>``."""
    return [f"prob_{name}" for name in classes]


def predict_tiles(
    inputs: Sequence[str | Path],
    out: str | Path,
    embedder: Embedder,
    head: ClassifierHead,
    *,
    num_workers: int = 2,
    progress: bool = True,
) -> PredictResult:
    """Classify every image under ``inputs`` and write ``path,predicted,prob_<class>...`` rows to ``out``.

    Paths are relative to the input folder (or the common parent of several inputs), as in
    ``virchow embed-tiles``. Unreadable images are logged, listed in the result and left out of
    the CSV, which is written to a temporary file and renamed when complete.

    Raises:
        ConfigError: no images were found, or the embedder does not match the head.
    """
    if embedder.kind != head.embedding:
        raise ConfigError(f"the head reads {head.embedding} embeddings but the embedder produces {embedder.kind}")
    if embedder.spec.name != head.model:
        raise ConfigError(f"the head was trained on model {head.model!r} but the backbone is {embedder.spec.name!r}")
    out = Path(out)
    root, files = find_images(inputs)
    if not files:
        raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {', '.join(map(str, inputs))}")
    embedder.prepare(len(files))
    relative = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
    loader = DataLoader(
        ImageFileDataset(files, OfficialTransform(embedder.spec.preprocess)),
        batch_size=embedder.batch_size,
        num_workers=num_workers,
        collate_fn=keep_items,
    )

    failed: list[tuple[str, str]] = []
    n_predicted = 0
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as handle, tqdm(
        total=len(files), unit="tile", desc="predict-tiles", disable=not progress
    ) as bar:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted", *probability_columns(head.classes)])
        for batch in loader:
            good = [(i, tensor) for i, tensor, _ in batch if tensor is not None]
            for i, tensor, reason in batch:
                if tensor is None:
                    _logger.warning("skipping %s: %s", relative[i], reason)
                    failed.append((relative[i], reason))
            if good:
                embeddings = embedder.embed_normalised(torch.stack([t for _, t in good]))
                probabilities = head.probabilities(embeddings)
                predicted = probabilities.argmax(dim=1).tolist()
                for (i, _), label, row in zip(good, predicted, probabilities.tolist(), strict=True):
                    writer.writerow([relative[i], head.classes[label], *(f"{p:.6g}" for p in row)])
                n_predicted += len(good)
            bar.update(len(batch))
    os.replace(tmp, out)

    seconds = time.perf_counter() - started
    _logger.info("scored %d images into %s in %.1f s, %d failed", n_predicted, out, seconds, len(failed))
    return PredictResult(out=out, n_predicted=n_predicted, failed=failed, seconds=seconds)
