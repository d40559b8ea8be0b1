"""Score frozen tile features with a linear probe and a k-nearest-neighbour probe.

Inputs (one of):
  --embeddings FILE.h5 --labels FILE.csv   output of 'virchow embed-tiles' joined on the tile path
  --image-folder DIR                       one subfolder per class, embedded with --model/--weights
                                           and cached under --cache-dir for later runs
  --table FILE.csv|FILE.parquet            one row per tile: feature columns and a label column

Splits come from --split-col (train/val/test) or from stratified k-fold (--folds), grouped by
--group-col (patient) so that no group is in two folds. The output folder receives report.json,
report.md, one confusion-matrix PNG and one prediction CSV per probe.

Examples:
  virchow probe --table kather.csv --feature-prefix f --label-col label --out runs/kather
  virchow probe --embeddings tiles.h5 --labels labels.csv --group-col patient --out runs/probe
  virchow probe --image-folder CRC-VAL-HE-7K --model virchow --out runs/crc --folds 5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

from virchow.downstream.metrics import BootstrapConfig
from virchow.downstream.probe import DEFAULT_C_GRID, ProbeConfig, run_probe
from virchow.downstream.probe_report import write_probe_report
from virchow.downstream.tile_inputs import LabelledFeatures, load_embeddings_with_labels, load_feature_table

HELP = "linear and kNN probes on tile embeddings, with cross-validated metrics and confidence intervals"

_logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/virchow/tile-embeddings`` (``~/.cache`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "virchow" / "tile-embeddings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the probe options to ``parser``."""
    from virchow.cli._common import add_model_arguments

    inputs = parser.add_argument_group("input (choose one)")
    source = inputs.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--embeddings", type=Path, help="HDF5 file written by 'virchow embed-tiles', used with --labels"
    )
    source.add_argument("--image-folder", type=Path, help="folder with one subfolder of tile images per class")
    source.add_argument("--table", type=Path, help="CSV or parquet table with one row per tile")
    inputs.add_argument(
        "--labels", type=Path, help="CSV with a path column matching the embeddings' paths and a label column"
    )
    inputs.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of --image-folder embeddings (default: $XDG_CACHE_HOME/virchow/tile-embeddings)",
    )
    inputs.add_argument(
        "--num-workers", type=int, default=2, help="image decoding processes for --image-folder (default: 2)"
    )

    columns = parser.add_argument_group("columns")
    columns.add_argument("--path-col", default="path", help="tile path column of --labels (default: path)")
    columns.add_argument("--label-col", default="label", help="class label column (default: label)")
    columns.add_argument("--group-col", default=None, help="patient column. Folds never split a group (default: none)")
    columns.add_argument(
        "--split-col", default=None, help="column with train/val/test per tile. Replaces k-fold (default: none)"
    )
    columns.add_argument(
        "--id-col", default=None, help="tile id column of --table for the prediction files (default: row number)"
    )
    columns.add_argument(
        "--feature-prefix",
        default=None,
        help="--table feature columns start with this prefix (default: every numeric column)",
    )
    columns.add_argument("--exclude-cols", nargs="+", default=[], help="--table columns that are never features")

    probe = parser.add_argument_group("probes")
    probe.add_argument(
        "--methods",
        nargs="+",
        choices=("linear", "knn"),
        default=["linear", "knn"],
        help="probes to run (default: linear knn)",
    )
    probe.add_argument(
        "--folds", type=int, default=5, help="outer cross-validation folds without --split-col (default: 5)"
    )
    probe.add_argument("--seed", type=int, default=0, help="seed of folds, inner CV and bootstrap (default: 0)")
    probe.add_argument(
        "--c-grid",
        type=float,
        nargs="+",
        default=list(DEFAULT_C_GRID),
        help="inverse regularisation strengths C tried by the inner CV (default: 1e-4 ... 1e2, 7 values)",
    )
    probe.add_argument("--inner-folds", type=int, default=3, help="inner CV folds for choosing C (default: 3)")
    probe.add_argument(
        "--max-iter", type=int, default=1000, help="lbfgs iteration limit of the logistic regression (default: 1000)"
    )
    probe.add_argument("--k", type=int, default=20, help="neighbours of the kNN probe (default: 20)")
    probe.add_argument(
        "--knn-weights",
        choices=("uniform", "distance"),
        default="uniform",
        help="kNN votes: uniform or weighted by inverse cosine distance (default: uniform)",
    )
    probe.add_argument(
        "--scaler",
        choices=("standard", "none"),
        default="standard",
        help="feature scaling fitted on each training split (default: standard)",
    )
    probe.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples per confidence interval, 0 to skip intervals (default: 1000)",
    )
    probe.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)"
    )
    probe.add_argument("--n-jobs", type=int, default=1, help="parallel jobs of the inner grid search (default: 1)")
    probe.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS/OpenMP threads while fitting (default: the libraries' own setting)",
    )

    parser.add_argument("--out", type=Path, required=True, help="output folder for the report")
    add_model_arguments(parser)


def load_inputs(args: argparse.Namespace) -> LabelledFeatures:
    """Load the labelled features that the input options name."""
    from virchow.errors import ConfigError

    if args.embeddings:
        if not args.labels:
            raise ConfigError("--embeddings needs --labels, a CSV with a path column and a label column")
        return load_embeddings_with_labels(
            args.embeddings,
            args.labels,
            path_col=args.path_col,
            label_col=args.label_col,
            group_col=args.group_col,
            split_col=args.split_col,
        )
    if args.table:
        return load_feature_table(
            args.table,
            label_col=args.label_col,
            feature_prefix=args.feature_prefix,
            exclude_cols=args.exclude_cols,
            id_col=args.id_col,
            group_col=args.group_col,
            split_col=args.split_col,
        )

    from virchow.cli._common import embedder_from_args
    from virchow.downstream.image_folder import embed_image_folder

    if args.group_col or args.split_col:
        raise ConfigError("--group-col and --split-col need a table. An --image-folder has only class folders")
    embedder = embedder_from_args(args)
    cache_dir = args.cache_dir or default_cache_dir()
    return embed_image_folder(args.image_folder, embedder, cache_dir, num_workers=args.num_workers)


def run(args: argparse.Namespace) -> int:
    """Run the probes and write the report. Return the exit status."""
    config = ProbeConfig(
        methods=tuple(dict.fromkeys(args.methods)),
        n_folds=args.folds,
        seed=args.seed,
        c_grid=tuple(args.c_grid),
        inner_folds=args.inner_folds,
        max_iter=args.max_iter,
        k=args.k,
        knn_weights=args.knn_weights,
        scaler=args.scaler,
        bootstrap=BootstrapConfig(n_resamples=args.bootstrap, confidence=args.confidence, seed=args.seed),
        n_jobs=args.n_jobs,
    )
    data = load_inputs(args)
    _logger.info("probing %d tiles x %d features, %d classes", *data.features.shape, len(set(data.labels.tolist())))

    with thread_limit(args.threads):
        result = run_probe(data, config)
    write_probe_report(result, args.out)
    return 0


def thread_limit(threads: int | None) -> contextlib.AbstractContextManager:
    """Limit BLAS/OpenMP threads inside the block, or change nothing when ``threads`` is None."""
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    return threadpool_limits(limits=threads)
