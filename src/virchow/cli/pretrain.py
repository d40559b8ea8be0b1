"""Pretrain or continue pretraining a Virchow backbone with the DINOv2 objective (DINO + iBOT + KoLeo or KDE).

The configuration is a YAML file plus section.key=value overrides, merged onto the defaults of
virchow.pretrain.config. The run directory (train.output_dir) receives config.yaml, run.json (git
commit and command line), metrics.jsonl, checkpoints/ and export/teacher, which --weights loads.
A run restarted with the same output directory resumes from checkpoints/last.pt.

Examples:
    virchow pretrain --config virchow2-continue data.slides=[/data/slides.txt] train.output_dir=runs/lab
    torchrun --nproc_per_node 8 -m virchow pretrain --config my.yaml train.sharding=fsdp
    virchow pretrain --export runs/lab/checkpoints/last.pt --out runs/lab/export/teacher
    virchow embed-tiles tiles/ --out tiles.h5 --model virchow2 --weights runs/lab/export/teacher
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

HELP = "pretrain a backbone with DINOv2 self-distillation, or export a checkpoint's teacher"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None,
        help="YAML file with the settings to change, or a bundled preset: default, virchow2-continue, "
        "virchow-continue, vit-s14-scratch",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="settings applied after the file, for example train.iterations=1000 crops.n_local=4",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit"
    )
    parser.add_argument(
        "--export", type=Path, default=None, metavar="CHECKPOINT",
        help="export a backbone (see --network) of this training checkpoint instead of training (needs --out)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder of --export")
    parser.add_argument(
        "--network", choices=("teacher", "student"), default="teacher", help="network that --export writes (default: teacher)"
    )


def run(args: argparse.Namespace) -> int:
    from virchow.errors import ConfigError

    if args.export is not None:
        if args.out is None:
            raise ConfigError("--export needs --out DIR, the folder to write config.json and model.safetensors to")
        from virchow.pretrain.export import export_checkpoint

        path = export_checkpoint(args.export, args.out, network=args.network)
        _logger.info("wrote %s", path)
        return 0

    from omegaconf import OmegaConf

    from virchow.pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0

    from virchow.pretrain.train import train

    if os.environ.get("RANK", "0") != "0":
        # Under torchrun only rank 0 reports progress; the other ranks log warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    result = train(cfg, argv=sys.argv)
    if result.export_dir is not None:
        _logger.info("teacher backbone exported to %s (load it with --weights %s)", result.export_dir, result.export_dir)
    return 0
