"""Train a slide- or specimen-level attention aggregator (ABMIL or Agata) with cross-validation.

Inputs are a folder of per-slide feature files and a CSV with one row per slide. The feature
files come from 'virchow embed-slides', or from TRIDENT/CLAM with 'features' and 'coords'. The CSV
has a slide id matching the file names (a '.h5' suffix is ignored) and one or more label columns
(empty cells are missing labels). Patient, specimen and split columns are optional. Slides without
features and feature files without a table row are listed by name before training.

Without --split-col, bags are split by StratifiedGroupKFold on the first label, grouped by
patient: fold k is the test fold and fold k+1 the validation fold for early stopping. Each fold is
trained once per seed. The output folder receives checkpoints/seed{S}_fold{K}.pt, metrics.json
(AUROC, AUPRC and balanced accuracy with bootstrap intervals, per fold and pooled), report.md
and predictions.csv.

Examples:
  virchow train-mil --features out/features --slides slides.csv --label-col label \\
      --patient-col patient --model abmil --seeds 0 1 2 --out runs/abmil
  virchow train-mil --features out/features --slides slides.csv --label-col cancer \\
      --specimen-col specimen --bag-by specimen --model agata --out runs/agata
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from virchow.downstream.mil.bags import BagStore, load_bag_table

HELP = "train ABMIL or Agata slide classifiers with patient-grouped cross-validation"

_logger = logging.getLogger(__name__)


def add_bag_arguments(parser: argparse.ArgumentParser, *, labels: bool) -> None:
    """Add the slide-table and feature-folder options shared by train-mil and predict-mil."""
    group = parser.add_argument_group("slides")
    group.add_argument(
        "--features",
        type=Path,
        required=True,
        help="folder of per-slide .h5 feature files (or an embed-slides output folder)",
    )
    group.add_argument(
        "--slides",
        type=Path,
        required=labels,
        help="CSV with one row per slide" + ("" if labels else " (default: every feature file, unlabelled)"),
    )
    group.add_argument(
        "--slide-col", default="slide_id", help="slide id column. A .h5 suffix is ignored (default: slide_id)"
    )
    if labels:
        group.add_argument(
            "--label-col",
            nargs="+",
            default=["label"],
            help="label columns, one classifier head each. Empty cells are missing labels (default: label)",
        )
        group.add_argument(
            "--split-col", default=None, help="column with train/val/test per slide. Replaces k-fold (default: none)"
        )
    group.add_argument(
        "--patient-col",
        default=None,
        help="patient id column. Folds never split a patient (default: none, folds group by bag)",
    )
    group.add_argument(
        "--specimen-col", default=None, help="specimen id column, needed for --bag-by specimen (default: none)"
    )
    group.add_argument(
        "--bag-by",
        choices=("slide", "specimen", "patient"),
        default=None if not labels else "slide",
        help="tiles of all slides of one slide, specimen or patient form one bag (default: slide"
        + ("" if labels else ". Predict-mil: the checkpoint's setting")
        + ")",
    )
    group.add_argument(
        "--cache-gib", type=float, default=4.0, help="memory for caching bag features between epochs, GiB (default: 4)"
    )
    group.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps (default: cpu)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the train-mil options to ``parser``."""
    add_bag_arguments(parser, labels=True)

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=("abmil", "agata"),
        default="abmil",
        help="aggregator: gated-attention ABMIL or Agata (default: abmil)",
    )
    model.add_argument(
        "--hidden-dim", type=int, default=512, help="ABMIL projection size or Agata key/value size (default: 512)"
    )
    model.add_argument("--attention-dim", type=int, default=256, help="ABMIL attention branch size (default: 256)")
    model.add_argument(
        "--dropout", type=float, default=None, help="dropout rate (default: 0.25 for abmil, 0 for agata)"
    )
    model.add_argument("--n-queries", type=int, default=1, help="Agata learned queries (default: 1)")
    model.add_argument(
        "--activation", choices=("relu", "gelu"), default="relu", help="Agata activation (default: relu)"
    )
    model.add_argument(
        "--scaled-attention", action="store_true", help="Agata: divide attention scores by sqrt(hidden dim)"
    )

    train = parser.add_argument_group("training")
    train.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default: 2e-4)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay (default: 0.01)")
    train.add_argument("--epochs", type=int, default=50, help="maximum epochs (default: 50)")
    train.add_argument(
        "--patience", type=int, default=10, help="epochs without a lower validation loss before stopping (default: 10)"
    )
    train.add_argument(
        "--class-weight",
        choices=("balanced", "none"),
        default="balanced",
        help="loss weights n/(K*n_c) per class, or none (default: balanced)",
    )
    train.add_argument(
        "--train-bag-size",
        type=int,
        default=None,
        help="tiles sampled per bag at each training step (default: all tiles)",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="bags per optimiser step, padded and masked. Combine with --train-bag-size (default: 1)",
    )
    train.add_argument(
        "--standardize",
        action="store_true",
        help="standardise features with mean/std of the training tiles of each fold",
    )
    train.add_argument(
        "--folds", type=int, default=5, help="cross-validation folds without --split-col, at least 3 (default: 5)"
    )
    train.add_argument(
        "--fold-seed",
        type=int,
        default=0,
        help="seed of the fold assignment, shared by all training seeds (default: 0)",
    )
    train.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds. Each fold is trained once per seed (default: 0)",
    )
    train.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples per confidence interval (default: 1000)"
    )
    train.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)"
    )
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own setting)")

    parser.add_argument("--out", type=Path, required=True, help="output folder for checkpoints and reports")


def run(args: argparse.Namespace) -> int:
    """Train, evaluate and write the report. Return the exit status."""
    import torch

    from virchow.downstream.metrics import BootstrapConfig
    from virchow.downstream.mil.cross_validation import CVConfig, run_cross_validation
    from virchow.downstream.mil.model import MILModelConfig
    from virchow.downstream.mil.report import write_mil_report
    from virchow.downstream.mil.train import TrainConfig
    from virchow.embed.device import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    # data: match the table to the feature files and build bags
    table = load_bag_table(
        args.features,
        args.slides,
        slide_col=args.slide_col,
        label_cols=args.label_col,
        patient_col=args.patient_col,
        specimen_col=args.specimen_col,
        split_col=args.split_col,
        bag_by=args.bag_by,
    )
    data_settings = {
        "slide_col": args.slide_col,
        "label_cols": args.label_col,
        "patient_col": args.patient_col,
        "specimen_col": args.specimen_col,
        "split_col": args.split_col,
        "bag_by": args.bag_by,
        "feature_dim": table.feature_dim,
        "features": str(args.features),
        "slides": str(args.slides),
    }

    # configuration, resolved once and saved with every checkpoint
    dropout = args.dropout
    if dropout is None:
        dropout = 0.25 if args.model == "abmil" else 0.0
    model_config = MILModelConfig(
        kind=args.model,
        in_features=table.feature_dim,
        n_classes=tuple(len(c) for c in table.classes),
        hidden_dim=args.hidden_dim,
        attention_dim=args.attention_dim,
        dropout=dropout,
        n_queries=args.n_queries,
        activation=args.activation,
        scaled_attention=args.scaled_attention,
    )
    train_config = TrainConfig(
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_epochs=args.epochs,
        patience=args.patience,
        class_weight=args.class_weight,
        train_bag_size=args.train_bag_size,
        batch_size=args.batch_size,
        standardize=args.standardize,
        device=str(device),
    )
    bootstrap = BootstrapConfig(n_resamples=args.bootstrap, confidence=args.confidence, seed=args.fold_seed)
    cv_config = CVConfig(
        n_folds=args.folds, fold_seed=args.fold_seed, seeds=tuple(dict.fromkeys(args.seeds)), bootstrap=bootstrap
    )
    config = {
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "data": data_settings,
        "cv": {"n_folds": args.folds, "fold_seed": args.fold_seed},
        "seeds": list(cv_config.seeds),
        "bootstrap": {"n_resamples": bootstrap.n_resamples, "confidence": bootstrap.confidence, "seed": bootstrap.seed},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _logger.info("train-mil configuration: %s", json.dumps(config, sort_keys=True))

    # cross-validation and report
    store = BagStore(cache_bytes=int(args.cache_gib * (1 << 30)))
    result = run_cross_validation(
        table, store, model_config, train_config, cv_config, args.out / "checkpoints", data_settings
    )
    write_mil_report(result, table, config, bootstrap, args.out)
    return 0
