"""Score slides or specimens with aggregators trained by 'virchow train-mil'.

Pass one checkpoint, or several (for example all folds of a run) to average their probabilities
and attention. Without --slides every feature file in --features is scored as its own bag. With
--slides the table decides which slides are scored and how they form bags. When the table has the
checkpoint's label columns, their values are copied next to the scores.

Outputs in --out: scores.csv (one row per bag: predicted class and one probability per class)
and attention/<slide_id>.h5 (per-tile attention with level-0 coordinates, for 'virchow heatmap').

Examples:
  virchow predict-mil --checkpoint runs/abmil/checkpoints/seed0_fold0.pt --features new/features --out preds
  virchow predict-mil --checkpoint runs/agata/checkpoints/*.pt --features new/features \\
      --slides new.csv --specimen-col specimen --out preds
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from virchow.cli.train_mil import add_bag_arguments

HELP = "score new slides with trained MIL checkpoints and save per-tile attention"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the predict-mil options to ``parser``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        required=True,
        help="checkpoint files from train-mil. Several are averaged",
    )
    add_bag_arguments(parser, labels=False)
    parser.add_argument("--out", type=Path, required=True, help="output folder for scores.csv and attention/")


def run(args: argparse.Namespace) -> int:
    """Score the bags and write the outputs. Return the exit status."""
    from virchow.downstream.mil.bags import load_bag_table, slide_table_columns
    from virchow.downstream.mil.predict import load_checkpoints, run_prediction
    from virchow.embed.device import resolve_device

    device = resolve_device(args.device)
    checkpoints = load_checkpoints(args.checkpoint)
    reference = checkpoints[0]
    data = reference.settings.get("data", {})
    bag_by = args.bag_by or data.get("bag_by", "slide")
    if args.slides is None and bag_by != "slide":
        _logger.warning("without --slides every feature file is its own bag. Ignoring --bag-by %s", bag_by)
        bag_by = "slide"

    # Label, patient and specimen column names come from the checkpoint when the table has those
    # columns and no option overrides them.
    columns = set(slide_table_columns(args.slides)) if args.slides is not None else set()
    label_cols = reference.label_cols if set(reference.label_cols) <= columns else []
    patient_col = args.patient_col or _known_column(data.get("patient_col"), columns)
    specimen_col = args.specimen_col or _known_column(data.get("specimen_col"), columns)
    table = load_bag_table(
        args.features,
        args.slides,
        slide_col=args.slide_col,
        label_cols=label_cols,
        patient_col=patient_col,
        specimen_col=specimen_col,
        bag_by=bag_by,
        classes=reference.classes if label_cols else None,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    run_prediction(args.checkpoint, table.bags, args.out, device)
    return 0


def _known_column(name: str | None, columns: set[str]) -> str | None:
    return name if name in columns else None
