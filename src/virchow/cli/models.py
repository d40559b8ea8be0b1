"""List the registered model variants with their architecture, weights and licence."""

from __future__ import annotations

import argparse
import sys

from virchow.models import get_model_spec, list_models

HELP = "list the model variants"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one variant in detail")


def run(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else list_models()
    for name in names:
        spec = get_model_spec(name)
        sys.stdout.write(f"{spec.name}: {spec.description}\n")
        if args.name:
            sys.stdout.write(f"  architecture: {spec.architecture} {spec.model_args}\n")
            sys.stdout.write(f"  mlp: {spec.mlp_layer} with SiLU; prefix tokens: {spec.num_prefix_tokens}\n")
            sys.stdout.write(f"  default weights: {spec.default_weights}\n  licence: {spec.license}\n")
            sys.stdout.write(f"  preprocessing: {spec.preprocess}\n")
    return 0
