"""Classify tile images with a model exported by 'virchow finetune'.

The export directory holds the backbone (config.json, model.safetensors) and the classifier
(head.pt, classes.json). The output CSV has one row per image: its path relative to the input
folder, the predicted class, and one prob_<class> column per class. Unreadable images are listed
and skipped, and the exit status is 1 when any failed.

Example:
    virchow predict-tiles tiles/ --weights runs/crc/export --out predictions.csv
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from virchow.embed.device import PRECISIONS
from virchow.errors import ConfigError
from virchow.models import list_models

HELP = "classify tile images with a fine-tuned model and write a CSV"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output CSV file")
    parser.add_argument("--weights", required=True, type=Path, help="export directory of 'virchow finetune' (RUN/export)")
    parser.add_argument("--head", type=Path, help="directory with head.pt and classes.json (default: --weights)")
    parser.add_argument("--model", choices=list_models(), help="model variant (default: the one in classes.json)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="autocast precision: auto is fp16 on GPUs, bf16 on CPUs with bf16 instructions, else fp32",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass (default: 32)")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from virchow.embed.embedder import create_embedder
    from virchow.finetune.export import load_head
    from virchow.finetune.predict import predict_tiles

    head = load_head(args.head or args.weights)
    if args.model is not None and args.model != head.model:
        raise ConfigError(f"--model {args.model} differs from the model the head was trained on ({head.model})")
    embedder = create_embedder(
        head.model,
        str(args.weights),
        kind=head.embedding,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        compile="auto",
    )
    _logger.info("classes: %s", json.dumps(head.classes))
    result = predict_tiles(
        args.inputs, args.out, embedder, head, num_workers=args.workers, progress=not args.no_progress
    )
    if result.failed:
        _logger.error("%d of %d images failed:", len(result.failed), len(result.failed) + result.n_predicted)
        for path, reason in result.failed:
            _logger.error("  %s: %s", path, reason)
        return 1
    return 0
