"""Embed folders of tile images into one HDF5 file (``virchow embed-tiles``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from virchow.embed.embedder import Embedder
from virchow.errors import ConfigError, ImageDecodeError
from virchow.io.h5 import STRING_DTYPE, atomic_h5, write_attrs
from virchow.preprocess import IMAGE_SUFFIXES, OfficialTransform, load_image

_logger = logging.getLogger(__name__)


@dataclass
class EmbedTilesResult:
    """Outcome of one ``embed-tiles`` job.

    Attributes:
        out: the HDF5 file written.
        n_embedded: images embedded and stored.
        failed: (relative path, reason) of each image that could not be read.
        seconds: wall time of reading and embedding.
    """

    out: Path
    n_embedded: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def find_images(inputs: Sequence[str | Path]) -> tuple[Path, list[Path]]:
    """List image files under ``inputs`` (files and folders, recursively), sorted per folder.

    Returns:
        The root that stored paths are relative to (the folder itself for a single folder, the
        common parent otherwise) and the image paths.

    Raises:
        ConfigError: an input does not exist.
    """
    files: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif entry.is_file():
            files.append(entry)
        else:
            raise ConfigError(f"input {entry} does not exist")
    files = [f.resolve() for f in files]
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        root = Path(inputs[0]).resolve()
    elif files:
        root = Path(os.path.commonpath([f.parent for f in files]))
    else:
        root = Path.cwd()
    return root, files


class ImageFileDataset(Dataset):
    """Image files through the official transform; an undecodable file gives ``None`` and the reason.

    Items are ``(index, tensor or None, reason)``; collate them with :func:`keep_items` so that
    failures reach the caller instead of stopping the DataLoader.
    """

    def __init__(self, files: list[Path], transform: OfficialTransform) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(load_image(self.files[index])), ""
        except ImageDecodeError as exc:
            return index, None, str(exc)


def keep_items(items: list[tuple[int, torch.Tensor | None, str]]) -> list[tuple[int, torch.Tensor | None, str]]:
    """Collate function that returns the items unchanged."""
    return items


def embed_tiles_to_h5(
    inputs: Sequence[str | Path],
    out: str | Path,
    embedder: Embedder,
    *,
    num_workers: int = 2,
    progress: bool = True,
    float16: bool = False,
) -> EmbedTilesResult:
    """Embed every image under ``inputs`` and write them to ``out`` atomically.

    The HDF5 file contains ``features`` (N, *embedding shape), float32 or float16, ``paths`` (N,)
    relative to the input root, ``failed_paths`` and ``failed_reasons`` for images that could not
    be decoded, and attributes naming the model, the weights provenance, the embedding kind, the
    precision and the software version. Unreadable images are skipped, logged and listed.
    """
    out = Path(out)
    root, files = find_images(inputs)
    if not files:
        raise ConfigError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {', '.join(map(str, inputs))}")
    embedder.prepare(len(files))
    loader = DataLoader(
        ImageFileDataset(files, OfficialTransform(embedder.spec.preprocess)),
        batch_size=embedder.batch_size,
        num_workers=num_workers,
        collate_fn=keep_items,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    relative = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]
    dtype = np.float16 if float16 else np.float32
    failed: list[tuple[str, str]] = []
    started = time.perf_counter()

    with atomic_h5(out) as handle:
        features = handle.create_dataset(
            "features", shape=(0, *embedder.output_shape), maxshape=(None, *embedder.output_shape), dtype=dtype,
            chunks=(max(1, min(256, len(files))), *embedder.output_shape),
        )
        stored_paths: list[str] = []
        with tqdm(total=len(files), unit="tile", desc="embed-tiles", disable=not progress) as bar:
            for batch in loader:
                good = [(i, tensor) for i, tensor, _ in batch if tensor is not None]
                for i, tensor, reason in batch:
                    if tensor is None:
                        _logger.warning("skipping %s: %s", relative[i], reason)
                        failed.append((relative[i], reason))
                if good:
                    embedded = embedder.embed_normalised(torch.stack([t for _, t in good])).numpy().astype(dtype)
                    start = features.shape[0]
                    features.resize(start + len(good), axis=0)
                    features[start:] = embedded
                    stored_paths.extend(relative[i] for i, _ in good)
                bar.update(len(batch))
        handle.create_dataset("paths", data=np.array(stored_paths, dtype=object), dtype=STRING_DTYPE)
        handle.create_dataset("failed_paths", data=np.array([p for p, _ in failed], dtype=object), dtype=STRING_DTYPE)
        handle.create_dataset("failed_reasons", data=np.array([r for _, r in failed], dtype=object), dtype=STRING_DTYPE)
        seconds = time.perf_counter() - started
        write_attrs(
            handle,
            {
                **embedder.metadata(),
                "root": str(root),
                "feature_dtype": np.dtype(dtype).name,
                "n_failed": len(failed),
                "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )

    _logger.info(
        "embedded %d images into %s in %.1f s (%.2f images/s); %d failed",
        len(stored_paths), out, seconds, len(stored_paths) / max(seconds, 1e-9), len(failed),
    )
    return EmbedTilesResult(out=out, n_embedded=len(stored_paths), failed=failed, seconds=seconds)
