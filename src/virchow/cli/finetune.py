"""Fine-tune Virchow and a linear classifier on labelled tiles.

Training data is an ImageFolder directory (ROOT/CLASS/IMAGE) or a CSV with path and label columns
(optionally a patient column for grouped splits and a split column). Modes: head (frozen backbone),
last-N (last N blocks, final norm and head), full, and lora (low-rank adapters on attention and
MLP layers). The run directory receives run_config.json, split.csv, metrics.jsonl, train.log,
last.pt and best.pt, and export/ with the backbone (LoRA merged) in the Hugging Face layout plus
head.pt and classes.json, which 'virchow predict-tiles --weights RUN/export' reads.

The same command runs on several GPUs or CPU processes under torchrun, and --batch-size is the
global batch and is split across processes and accumulation steps.

Examples:
    virchow finetune tiles/ --out runs/crc --model virchow --weights /models/virchow --mode lora
    virchow finetune tiles.csv --group-col patient --mode last-4 --out runs/crc4 --epochs 20
    torchrun --nproc_per_node 4 -m virchow finetune tiles/ --out runs/crc --mode full --batch-size 64
    virchow finetune tiles/ --out runs/crc --resume
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from virchow.embed.device import PRECISIONS
from virchow.finetune.config import CLASS_WEIGHTS, COLOR_JITTERS, DEFAULT_LR, MONITORS, FinetuneConfig
from virchow.models import list_models

HELP = "fine-tune Virchow and a tile classifier on labelled tiles"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="ImageFolder directory (one subfolder per class) or CSV file of training tiles")
    parser.add_argument("--out", required=True, type=Path, help="run directory for checkpoints, logs and the export")

    data = parser.add_argument_group("data")
    data.add_argument("--val-data", help="validation tiles (folder or CSV) instead of a split of DATA")
    data.add_argument("--val-fraction", type=float, default=0.2, help="share drawn for validation, 0 for none (default: 0.2)")
    data.add_argument("--root", help="folder that relative CSV paths are resolved against (default: the CSV's folder)")
    data.add_argument("--path-col", default="path", help="CSV column of image paths (default: path)")
    data.add_argument("--label-col", default="label", help="CSV column of class labels (default: label)")
    data.add_argument("--group-col", help="CSV column of patient ids, so that drawn splits keep each patient in one part")
    data.add_argument("--split-col", help="CSV column with train/val/test per row (test rows are ignored)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="virchow", choices=list_models(), help="model variant (default: virchow)")
    model.add_argument(
        "--weights",
        help="base weights: hf-hub:OWNER/REPO[@REV], a Hugging Face directory, a checkpoint file, or random[:SEED] "
        "(default: the model's official repository)",
    )
    model.add_argument(
        "--embedding", default="cls+mean", choices=("cls+mean", "cls", "mean"),
        help="tokens pooled for the classifier (default: cls+mean)",
    )
    model.add_argument(
        "--mode", default="lora", metavar="{head,last-N,full,lora}",
        help="what trains: the head only, the last N blocks (for example last-4), everything, or LoRA adapters "
        "(default: lora)",
    )
    model.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default: 8)")
    model.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha, which scales updates by alpha/r (default: 16)")
    model.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")

    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10, help="passes over the training tiles (default: 10)")
    train.add_argument("--batch-size", type=int, default=32, help="global tiles per optimiser step (default: 32)")
    train.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per optimiser step (default: 1)")
    defaults = ", ".join(f"{mode} {lr:g}" for mode, lr in DEFAULT_LR.items())
    train.add_argument("--lr", type=float, help=f"peak learning rate of the head (default by mode: {defaults})")
    train.add_argument("--layer-decay", type=float, default=0.75, help="learning-rate factor per block below the head (default: 0.75)")
    train.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    train.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length in epochs (default: 1)")
    train.add_argument("--min-lr-ratio", type=float, default=0.0, help="final learning rate as a fraction of the peak (default: 0)")
    train.add_argument("--max-grad-norm", type=float, help="clip the gradient norm to this value (default: no clipping)")
    train.add_argument(
        "--precision", default="auto", choices=PRECISIONS,
        help="autocast precision: auto is fp16 on GPUs (with a gradient scaler), bf16 on CPUs with bf16 instructions, else fp32",
    )
    train.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    train.add_argument("--class-weights", default="none", choices=CLASS_WEIGHTS, help="balanced weights classes by n/(k*n_class)")
    train.add_argument("--monitor", default="balanced_accuracy", choices=MONITORS, help="validation metric for early stopping")
    train.add_argument("--patience", type=int, default=5, help="epochs without improvement before stopping, 0 to disable (default: 5)")
    train.add_argument("--no-augment", action="store_true", help="train without flips, rotations, colour jitter and blur")
    train.add_argument("--color-jitter", default="hed", choices=COLOR_JITTERS, help="colour augmentation space (default: hed)")
    train.add_argument("--color-strength", type=float, default=0.05, help="colour jitter range (default: 0.05)")
    train.add_argument("--blur-prob", type=float, default=0.2, help="probability of a mild Gaussian blur (default: 0.2)")
    train.add_argument("--seed", type=int, default=0, help="seed of the split, shuffling, augmentation and head (default: 0)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    run.add_argument("--workers", type=int, default=2, help="image decoding processes per training process (default: 2)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--stop-after-epoch", type=int, help="end after this epoch and keep the checkpoint for --resume")
    run.add_argument("--no-export", action="store_true", help="skip writing OUT/export at the end")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Build the run configuration from parsed command-line options."""
    return FinetuneConfig(
        data=args.data,
        out_dir=str(args.out),
        val_data=args.val_data,
        root=args.root,
        path_col=args.path_col,
        label_col=args.label_col,
        group_col=args.group_col,
        split_col=args.split_col,
        val_fraction=args.val_fraction,
        model=args.model,
        weights=args.weights,
        embedding=args.embedding,
        mode=args.mode,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accumulation_steps=args.accumulation_steps,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        min_lr_ratio=args.min_lr_ratio,
        max_grad_norm=args.max_grad_norm,
        precision=args.precision,
        grad_checkpointing=args.grad_checkpointing,
        class_weights=args.class_weights,
        monitor=args.monitor,
        patience=args.patience,
        augment=not args.no_augment,
        color_jitter=args.color_jitter,
        color_strength=args.color_strength,
        blur_prob=args.blur_prob,
        seed=args.seed,
        num_workers=args.workers,
        device=args.device,
        resume=args.resume,
        stop_after_epoch=args.stop_after_epoch,
        export=not args.no_export,
        progress=not args.no_progress,
    )


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """Copy INFO and above to ``path`` while the console keeps the level that -v/-q chose."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    console_level = root.getEffectiveLevel()
    saved = [(handler, handler.level) for handler in root.handlers]
    for handler, level in saved:
        handler.setLevel(max(level, console_level))
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(min(console_level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(console_level)
        for handler, level in saved:
            handler.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from virchow.finetune.train import run_finetune

    config = config_from_args(args)
    if int(os.environ.get("RANK", "0")) == 0:
        with _log_file(Path(config.out_dir) / "train.log"):
            result = run_finetune(config)
    else:
        # Other ranks train the same model as rank 0, so only their warnings and errors are of interest.
        logging.getLogger().setLevel(logging.WARNING)
        result = run_finetune(config)
    if result.export_dir is not None:
        _logger.info("exported to %s: score tiles with 'virchow predict-tiles TILES --weights %s'", result.export_dir, result.export_dir)
    return 0
