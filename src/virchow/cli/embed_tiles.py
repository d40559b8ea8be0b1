"""Embed tile images (files or folders, searched recursively) into one HDF5 file.

The file contains `features` (N x D float32), `paths` relative to the input folder, the images that
failed, and attributes naming the model, the weights and their SHA-256, the embedding kind and the
precision. Unreadable images are listed and skipped; the exit status is 1 when any failed.

Example:
    virchow embed-tiles tiles/ --out tiles.h5 --model virchow --weights /models/virchow
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from virchow.cli._common import add_model_arguments, embedder_from_args
from virchow.embed.tiles import embed_tiles_to_h5

HELP = "embed tile images into an HDF5 file"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output HDF5 file")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    parser.add_argument("--float16", action="store_true", help="store features as float16 (computed in float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    embedder = embedder_from_args(args)
    result = embed_tiles_to_h5(
        args.inputs, args.out, embedder, num_workers=args.workers, progress=not args.no_progress, float16=args.float16
    )
    if result.failed:
        _logger.error("%d of %d images failed:", len(result.failed), len(result.failed) + result.n_embedded)
        for path, reason in result.failed:
            _logger.error("  %s: %s", path, reason)
        return 1
    return 0
