"""Embed an ImageFolder tree (one subfolder per class) for the probe, with an on-disk cache.

The cache file name is a hash of the folder listing (relative path, size and modification time of
every image) and of the embedder settings that change the numbers (model, architecture, weights
source and digests, embedding kind, precision). A second run over an unchanged folder with the
same settings reads the cached HDF5 file instead of running the model. Device, compilation and
software versions are not part of the key, so embeddings made on another device are reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from virchow.downstream.tile_inputs import LabelledFeatures, format_names, read_embeddings_h5
from virchow.errors import DataError

_logger = logging.getLogger(__name__)

# Embedder metadata entries that change the embedding values and therefore key the cache.
CACHE_KEY_FIELDS = (
    "model",
    "architecture",
    "weights_source",
    "weights_sha256",
    "weights_random",
    "embedding_kind",
    "precision",
)


def list_image_folder(root: Path) -> list[tuple[str, str]]:
    """List (relative POSIX path, class name) of the images in ``root``'s class subfolders.

    Images directly in ``root`` have no class and are skipped with a warning. Hidden files and
    folders are ignored.

    Raises:
        DataError: if ``root`` is not a folder or contains fewer than two classes with images.
    """
    from virchow.preprocess import IMAGE_SUFFIXES

    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    entries: list[tuple[str, str]] = []
    loose: list[str] = []
    for path in sorted(root.rglob("*")):
        relative = PurePosixPath(path.relative_to(root).as_posix())
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if len(relative.parts) == 1:
            loose.append(str(relative))
            continue
        entries.append((str(relative), relative.parts[0]))
    if loose:
        _logger.warning(
            "%d images lie directly in %s, outside a class folder, and are skipped: %s",
            len(loose),
            root,
            format_names(loose),
        )

    classes = sorted({label for _, label in entries})
    if len(classes) < 2:
        raise DataError(f"{root} needs at least two class subfolders with images, found {classes}")
    return entries


def folder_fingerprint(root: Path, entries: list[tuple[str, str]]) -> str:
    """Hash the relative path, size and modification time (ns) of every listed image."""
    digest = hashlib.sha256()
    for relative, _ in entries:
        stat = (root / relative).stat()
        digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(fingerprint: str, embedder_metadata: dict[str, Any]) -> str:
    """Combine the folder fingerprint and the value-relevant embedder settings into a short key."""
    settings = {name: embedder_metadata.get(name) for name in CACHE_KEY_FIELDS}
    payload = json.dumps({"folder": fingerprint, "embedder": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def embed_image_folder(
    root: Path, embedder: Any, cache_dir: Path, *, num_workers: int = 2, progress: bool = True
) -> LabelledFeatures:
    """Embed every image of an ImageFolder tree, or load the embeddings from the cache.

    Args:
        root: folder with one subfolder of images per class.
        embedder: a :class:`virchow.embed.embedder.Embedder` (anything with ``metadata()`` that
            ``embed_tiles_to_h5`` accepts).
        cache_dir: folder of cached embedding files, created if needed.
        num_workers: image decoding worker processes.
        progress: show a progress bar while embedding.

    Returns:
        Features with class labels. ``source`` records the cache file and whether it was reused.

    Raises:
        DataError: if the folder has fewer than two classes or no image could be embedded.
    """
    from virchow.embed.tiles import embed_tiles_to_h5

    entries = list_image_folder(root)
    metadata = embedder.metadata()
    key = cache_key(folder_fingerprint(root, entries), metadata)
    cache_file = cache_dir / f"{root.resolve().name}-{key}.h5"

    reused = cache_file.is_file()
    if reused:
        _logger.info("reusing cached embeddings %s for %s (%d images)", cache_file, root, len(entries))
    else:
        _logger.info("embedding %d images of %s into cache file %s", len(entries), root, cache_file)
        cache_dir.mkdir(parents=True, exist_ok=True)
        result = embed_tiles_to_h5([root], cache_file, embedder, num_workers=num_workers, progress=progress)
        if result.failed:
            names = [path for path, _ in result.failed]
            _logger.warning("%d images could not be read and are left out: %s", len(names), format_names(names))

    features, paths, attrs = read_embeddings_h5(cache_file)
    label_of = dict(entries)
    keep = [i for i, path in enumerate(paths) if PurePosixPath(path).as_posix() in label_of]
    if not keep:
        raise DataError(f"none of the {len(entries)} images in {root} was embedded. See the warnings above")
    kept_paths = np.array([PurePosixPath(paths[i]).as_posix() for i in keep], dtype=object)
    return LabelledFeatures(
        features=features[keep],
        labels=np.array([label_of[p] for p in kept_paths]),
        ids=kept_paths,
        source={
            "kind": "image_folder",
            "image_folder": str(root),
            "cache_file": str(cache_file),
            "cache_reused": reused,
            "attributes": attrs,
        },
    )
