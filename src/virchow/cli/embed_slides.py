"""Embed whole-slide images into tile features at an exact resolution (the main job).

For each slide: find tissue, tile it at exactly --mpp (default 0.5 um/px) in 224 x 224 tiles,
embed every tile, and write OUT/features/<slide_id>.h5 (`features`, `coords` in level-0 pixels,
`failed_coords`, and attributes describing the model, the weights and the tiling), a QC
thumbnail and a QuPath GeoJSON of the tissue in OUT/qc/, and one row per slide in
OUT/manifest.csv. Files are written under a temporary name and renamed when complete; a rerun
skips slides already done with the same settings. Several workers may share OUT.

Inputs are slide files, folders (searched recursively) or CSV manifests with a `path` column and
optional `slide_id`, `mpp` (um/px override) and `mask` (GeoJSON or PNG tissue mask) columns.

Example:
    virchow embed-slides slides/ --out features_run1 --weights /models/virchow
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from virchow.cli._common import add_model_arguments, embedder_from_args
from virchow.errors import MissingExtraError
from virchow.pipeline import SlideJobConfig, embed_slides
from virchow.wsi.tiling import DEFAULT_MIN_TISSUE

HELP = "embed whole-slide images into per-slide HDF5 feature files"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="PATH", help="slide files, folders or CSV manifests")
    parser.add_argument("--out", required=True, type=Path, help="output folder")

    tiling = parser.add_argument_group("tiling")
    tiling.add_argument("--mpp", type=float, default=0.5, help="tile pixel size in um/px (default: 0.5)")
    tiling.add_argument("--tile-size", type=int, default=224, help="tile side in pixels (default: 224)")
    tiling.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles (default: 0)")
    tiling.add_argument(
        "--min-tissue", type=float, default=DEFAULT_MIN_TISSUE,
        help=f"minimum tissue fraction of a kept tile (default: {DEFAULT_MIN_TISSUE})",
    )
    tiling.add_argument(
        "--edge", choices=("drop", "pad"), default="drop",
        help="drop: tiles never cross the slide edge (default); pad: keep edge tiles, padded white",
    )
    tiling.add_argument(
        "--tissue", choices=("otsu", "none", "mask"), default="otsu",
        help="otsu: saturation + Otsu detection (default); none: the whole slide; mask: per-slide masks "
        "from the CSV manifest's 'mask' column",
    )
    tiling.add_argument(
        "--assume-mpp", type=float, default=None,
        help="pixel size (um/px) for slides whose metadata has none; recorded in the output",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--float16", action="store_true", help="store features as float16 (computed in float32)")
    run.add_argument("--read-workers", type=int, default=2, help="threads reading tiles ahead of the model (default: 2)")
    run.add_argument("--no-qc", action="store_true", help="skip the QC thumbnail and tissue GeoJSON")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray")

    ray = parser.add_argument_group("ray engine")
    ray.add_argument("--ray-address", default=None, help="Ray cluster address for --engine ray (default: start or join a local one)")
    ray.add_argument("--ray-replicas", type=int, default=None, help="model replicas (default: one per GPU, or as CPUs allow)")
    ray.add_argument("--ray-cpus-per-replica", type=float, default=None, help="CPUs reserved by each replica")
    ray.add_argument("--ray-slides-per-replica", type=int, default=2, help="slides in flight per replica (default: 2)")
    ray.add_argument(
        "--ray-max-slide-retries", type=int, default=2,
        help="attempts after a replica died on a slide, before it is recorded as worker_died (default: 2)",
    )
    ray.add_argument("--ray-max-restarts", type=int, default=8, help="restarts of each replica process (default: 8)")

    add_model_arguments(parser)


def config_from_args(args: argparse.Namespace) -> SlideJobConfig:
    """Build the job settings from the parsed options."""
    return SlideJobConfig(
        target_mpp=args.mpp,
        tile_size=args.tile_size,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
        edge=args.edge,
        tissue=args.tissue,
        assume_mpp=args.assume_mpp,
        float16=args.float16,
        read_workers=args.read_workers,
        qc=not args.no_qc,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.engine == "ray":
        try:
            from virchow.distributed.ray_engine import embed_slides_ray
        except ImportError as exc:
            raise MissingExtraError(
                f"--engine ray needs Ray: pip install 'virchow[ray]' ({exc})"
            ) from exc
        summary = embed_slides_ray(args, config)
    else:
        embedder = embedder_from_args(args)
        summary = embed_slides(args.inputs, args.out, embedder, config, progress=not args.no_progress)
    return 0 if summary.ok else 1
