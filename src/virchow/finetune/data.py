"""Labelled tile sources, the validation split, and the dataset and sampler used for training.

A source is an ImageFolder directory (one subfolder per class, images found recursively) or a CSV
file with an image path and a label per row. The validation split comes from a second source, from
a split column, or is drawn: stratified by class, and grouped by patient with scikit-learn's
``StratifiedGroupKFold`` when a group column exists, so that no patient is in both parts.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from virchow.downstream.splits import Fold, check_group_leakage, split_from_column
from virchow.errors import DataError
from virchow.finetune.augment import TileAugment
from virchow.finetune.config import FinetuneConfig
from virchow.models.registry import PreprocessConfig
from virchow.preprocess import IMAGE_SUFFIXES, OfficialTransform, load_image

_logger = logging.getLogger(__name__)

_MAX_LISTED = 5


@dataclass(frozen=True)
class TileTable:
    """Image paths with class indices and optional patient ids.

    Attributes:
        paths: absolute image paths.
        labels: (N,) class index into the run's class list.
        groups: (N,) patient ids as strings, or None without a group column.
    """

    paths: list[Path]
    labels: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> TileTable:
        groups = self.groups[indices] if self.groups is not None else None
        return TileTable([self.paths[i] for i in indices], self.labels[indices], groups)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


@dataclass(frozen=True)
class TileSplit:
    """Training and validation tiles with the class names.

    Attributes:
        classes: class names. Label i refers to ``classes[i]``.
        train: training tiles.
        val: validation tiles, empty when the run has no validation split.
        method: how the validation split was obtained, for logs and the run record.
    """

    classes: list[str]
    train: TileTable
    val: TileTable
    method: str

    def digest(self) -> str:
        """Return a SHA-256 over every (part, path, label), to detect changed data on resume."""
        digest = hashlib.sha256()
        for part, table in (("train", self.train), ("val", self.val)):
            for path, label in zip(table.paths, table.labels.tolist(), strict=True):
                digest.update(f"{part}\t{path}\t{self.classes[label]}\n".encode())
        return digest.hexdigest()

    def write_csv(self, path: Path) -> None:
        """Write one row per tile with its path, label, group and split."""
        rows = []
        for part, table in (("train", self.train), ("val", self.val)):
            for i, tile in enumerate(table.paths):
                group = table.groups[i] if table.groups is not None else ""
                rows.append({"path": str(tile), "label": self.classes[table.labels[i]], "group": group, "split": part})
        pd.DataFrame(rows, columns=["path", "label", "group", "split"]).to_csv(path, index=False)


@dataclass(frozen=True)
class _RawSource:
    paths: list[Path]
    labels: list[str]
    groups: list[str] | None
    splits: list[str] | None


def prepare_split(config: FinetuneConfig) -> TileSplit:
    """Read the training source and build the validation split that ``config`` requests.

    Raises:
        DataError: a source is missing, empty or inconsistent, or the split cannot be drawn.
    """
    source = _read_source(Path(config.data), config, role="training")
    val_source = _read_source(Path(config.val_data), config, role="validation") if config.val_data else None

    classes = _sorted_classes(set(source.labels))
    if len(classes) < 2:
        raise DataError(f"training data {config.data} has {len(classes)} class(es), but a classifier needs at least 2")
    if val_source is not None:
        unknown = sorted(set(val_source.labels) - set(classes))
        if unknown:
            raise DataError(f"validation data {config.val_data} has classes missing from the training data: {unknown}")

    table = _to_table(source, classes)
    if val_source is not None:
        split = TileSplit(classes, table, _to_table(val_source, classes), f"separate source {config.val_data}")
    elif config.split_col is not None:
        split = _split_from_column(table, source.splits or [], classes, config.split_col)
    elif config.val_fraction > 0:
        split = _draw_split(table, classes, config.val_fraction, config.seed)
    else:
        empty = TileTable([], np.empty(0, dtype=np.int64), None)
        split = TileSplit(classes, table, empty, "none (val_fraction 0)")

    _log_split(split)
    return split


def _read_source(path: Path, config: FinetuneConfig, *, role: str) -> _RawSource:
    if path.is_dir():
        return _read_image_folder(path, role)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        return _read_csv(path, config)
    raise DataError(
        f"{role} data {path} not found or not usable: give an ImageFolder directory (one subfolder of images per "
        "class) or a .csv file with path and label columns"
    )


def _read_image_folder(root: Path, role: str) -> _RawSource:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{role} folder {root} has no class subfolders: the expected layout is ROOT/CLASS_NAME/IMAGE")
    paths: list[Path] = []
    labels: list[str] = []
    for class_dir in class_dirs:
        images = sorted(
            p.resolve() for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            raise DataError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths.extend(images)
        labels.extend([class_dir.name] * len(images))
    return _RawSource(paths, labels, None, None)


def _read_csv(path: Path, config: FinetuneConfig) -> _RawSource:
    table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    wanted = [config.path_col, config.label_col]
    wanted += [col for col in (config.group_col, config.split_col) if col is not None]
    missing = [col for col in wanted if col not in table.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}. Its columns are {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path} has no rows")
    empty_labels = int((table[config.label_col].str.strip() == "").sum())
    if empty_labels:
        raise DataError(f"{path}: {empty_labels} row(s) have an empty {config.label_col!r}: remove or label them")

    root = Path(config.root) if config.root else path.parent
    paths = [_resolve_path(value, root) for value in table[config.path_col]]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise DataError(
            f"{path}: {len(absent)} image(s) not found, for example {absent[:_MAX_LISTED]}. Relative paths are "
            f"resolved against {root} (set root to change that)"
        )
    labels = [value.strip() for value in table[config.label_col]]
    groups = [value.strip() for value in table[config.group_col]] if config.group_col else None
    splits = list(table[config.split_col]) if config.split_col else None
    return _RawSource(paths, labels, groups, splits)


def _resolve_path(value: str, root: Path) -> Path:
    path = Path(value.strip()).expanduser()
    return (path if path.is_absolute() else root / path).resolve()


def _sorted_classes(labels: set[str]) -> list[str]:
    """Sort class names numerically when all are integers, otherwise as strings."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _to_table(source: _RawSource, classes: list[str]) -> TileTable:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[label] for label in source.labels], dtype=np.int64)
    groups = np.array(source.groups, dtype=object) if source.groups is not None else None
    return TileTable(list(source.paths), labels, groups)


def _split_from_column(table: TileTable, values: list[str], classes: list[str], column: str) -> TileSplit:
    fold = split_from_column(values, require_val=True)
    if fold.test.size:
        _logger.info("ignoring %d rows marked 'test' in column %r", fold.test.size, column)
    if table.groups is not None:
        check_group_leakage([Fold(0, fold.train, np.empty(0, dtype=np.int64), fold.val)], table.groups)
    return TileSplit(classes, table.subset(fold.train), table.subset(fold.val), f"split column {column!r}")


def _draw_split(table: TileTable, classes: list[str], val_fraction: float, seed: int) -> TileSplit:
    counts = Counter(table.labels.tolist())
    too_small = [classes[label] for label, count in sorted(counts.items()) if count < 2]
    if too_small:
        raise DataError(
            f"classes {too_small} have a single tile, so a stratified validation split cannot hold them: add "
            "tiles, give a separate validation source, or set val_fraction 0"
        )
    placeholder = np.zeros(len(table))

    if table.groups is not None:
        num_groups = len(set(table.groups.tolist()))
        n_splits = max(2, round(1.0 / val_fraction))
        if num_groups < n_splits:
            raise DataError(
                f"a grouped validation split of {val_fraction:.0%} needs at least {n_splits} patients, found "
                f"{num_groups}: raise val_fraction or give a separate validation source"
            )
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        train, val = next(splitter.split(placeholder, table.labels, table.groups))
        check_group_leakage([Fold(0, train, np.empty(0, dtype=np.int64), val)], table.groups)
        method = f"drawn: StratifiedGroupKFold, 1 of {n_splits} folds by patient, seed {seed}"
    else:
        num_val = int(np.ceil(val_fraction * len(table)))
        if num_val < len(classes) or len(table) - num_val < len(classes):
            raise DataError(
                f"a stratified validation split of {val_fraction:.0%} of {len(table)} tiles has {num_val} tiles, but "
                f"both parts need one tile of each of the {len(classes)} classes. Change val_fraction so that "
                f"{len(classes)} <= val_fraction * {len(table)} <= {len(table) - len(classes)}"
            )
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=num_val, random_state=seed)
        train, val = next(splitter.split(placeholder, table.labels))
        method = f"drawn: StratifiedShuffleSplit, {num_val} of {len(table)} tiles, seed {seed}"
    return TileSplit(classes, table.subset(np.sort(train)), table.subset(np.sort(val)), method)


def _log_split(split: TileSplit) -> None:
    num_classes = len(split.classes)
    train_counts = split.train.class_counts(num_classes)
    val_counts = split.val.class_counts(num_classes) if len(split.val) else np.zeros(num_classes, dtype=np.int64)
    _logger.info(
        "data: %d training and %d validation tiles in %d classes, validation split: %s",
        len(split.train), len(split.val), num_classes, split.method,
    )
    for name, n_train, n_val in zip(split.classes, train_counts.tolist(), val_counts.tolist(), strict=True):
        _logger.info("  class %-20s train %6d  val %6d", name, n_train, n_val)
    missing = [name for name, n in zip(split.classes, val_counts.tolist(), strict=True) if n == 0]
    if len(split.val) and missing:
        _logger.warning("validation split has no tiles of classes %s, so their recall is undefined", missing)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Return n / (k * n_class) per class, so that the weights average to 1 over the samples.

    Raises:
        DataError: a class has no training tiles.
    """
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise DataError(f"classes {np.flatnonzero(counts == 0).tolist()} have no training tiles, so they cannot be weighted")
    return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Derive the augmentation seed of one tile in one epoch from the run seed."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class TileDataset(Dataset):
    """Tiles through the official resize and crop, optional augmentation, and normalisation.

    Items are requested as ``(index, epoch)`` pairs: the augmentation of a tile is seeded from
    the run seed, the epoch and the index, so it is the same in any worker, process or resumed run.

    Args:
        table: the tiles.
        preprocess: the model's preprocessing (input size, resampling, mean and std).
        augment: augmentation for training, or None for evaluation.
        seed: run seed.
    """

    def __init__(
        self, table: TileTable, preprocess: PreprocessConfig, augment: TileAugment | None = None, seed: int = 0
    ) -> None:
        self.table = table
        official = OfficialTransform(preprocess).transform
        steps = list(official.transforms)
        # timm's eval transform ends with Normalize, and augmentation must run on [0, 1] pixels before it.
        assert isinstance(steps[-1], transforms.Normalize), f"unexpected timm transform {official}"
        self.to_tensor = transforms.Compose(steps[:-1])
        self.normalize = steps[-1]
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.to_tensor(load_image(self.table.paths[index]))
        if self.augment is not None:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            image = self.augment(image, generator)
        return self.normalize(image), int(self.table.labels[index]), index


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffle once per epoch and cut global batches that are split across accumulation steps and ranks.

    The permutation depends only on the seed and the epoch, and each global batch of
    ``batch_size`` tiles is cut into ``accumulation_steps * world_size`` equal micro-batches, of
    which this rank takes one per accumulation step. One process with batch B therefore receives
    exactly the tiles that N processes receive together. The last incomplete global batch of an
    epoch is dropped, unlike ``DistributedSampler``, which pads ranks by repeating tiles.

    Args:
        num_samples: size of the training set.
        batch_size: tiles per optimiser step over all ranks.
        accumulation_steps: micro-batches per optimiser step on each rank.
        rank: this process's rank.
        world_size: number of processes.
        seed: run seed.
    """

    def __init__(
        self, num_samples: int, batch_size: int, accumulation_steps: int, rank: int, world_size: int, seed: int
    ) -> None:
        parts = accumulation_steps * world_size
        if batch_size % parts:
            raise DataError(
                f"batch size {batch_size} cannot be split into {accumulation_steps} accumulation step(s) x "
                f"{world_size} process(es): use a multiple of {parts}"
            )
        if num_samples < batch_size:
            raise DataError(f"the training set has {num_samples} tiles, fewer than one batch of {batch_size}: lower the batch size")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = batch_size // parts
        self.seed = seed
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per epoch."""
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation_steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        per_step = self.micro_batch_size * self.world_size
        for step in range(self.steps_per_epoch):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            for micro in range(self.accumulation_steps):
                start = micro * per_step + self.rank * self.micro_batch_size
                yield [(index, self.epoch) for index in batch[start : start + self.micro_batch_size]]
