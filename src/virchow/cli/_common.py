"""Options shared by the commands that load a model."""

from __future__ import annotations

import argparse

from virchow.embed.device import PRECISIONS
from virchow.embed.embedder import Embedder, create_embedder
from virchow.models import EMBEDDING_KINDS, list_models


def add_model_arguments(parser: argparse.ArgumentParser, *, batch_size: int = 32) -> None:
    """Add ``--model --weights --device --precision --embedding --batch-size --compile``."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="virchow", choices=list_models(), help="model variant (default: virchow)")
    group.add_argument(
        "--weights",
        default=None,
        help="hf-hub:OWNER/REPO[@REV], a directory with config.json and model.safetensors or pytorch_model.bin, "
        "a .safetensors/.bin/.pt file, or random[:SEED] for a labelled dry run (default: the model's official "
        "Hugging Face repository)",
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="autocast precision; auto is fp16 on GPUs, bf16 on CPUs with bf16 instructions, else fp32",
    )
    group.add_argument(
        "--embedding",
        default="cls+mean",
        choices=EMBEDDING_KINDS,
        help="cls+mean (class token and mean of patch tokens, 2560 floats, default), cls, mean or patch_tokens",
    )
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"tiles per forward pass (default: {batch_size})")
    group.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the model; auto does it on CPUs under bf16 for jobs large enough to repay the compile time",
    )


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """Build the embedder that the options of :func:`add_model_arguments` describe."""
    return create_embedder(
        args.model,
        args.weights,
        kind=args.embedding,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        compile=args.compile,
    )
