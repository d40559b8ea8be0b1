"""Overlay per-tile attention or scores on a slide thumbnail.

Tile positions come from the slide's feature file (level-0 top-left 'coords' and the tile size
'patch_size_level0') or from the scores file itself. Scores come from one of:
  --scores FILE.h5    an attention file written by 'virchow predict-mil' (dataset --score-key)
  --scores FILE.csv   a table with columns x, y and --score-key
  --checkpoint CKPT   train-mil checkpoints (several are averaged), run on --features now

Outputs in --out: <slide>_heatmap.png (exactly the thumbnail size), <slide>_tiles.csv (x, y, score)
and <slide>_tiles.geojson (one level-0 Polygon per tile with the score as a QuPath measurement).

Examples:
  virchow heatmap --slide S1.svs --features out/features/S1.h5 --scores preds/attention/S1.h5 --out maps
  virchow heatmap --slide S1.svs --features out/features/S1.h5 --checkpoint runs/abmil/checkpoints/*.pt --out maps
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "overlay per-tile attention or scores on a slide thumbnail and export them as CSV and GeoJSON"

_logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the heatmap options to ``parser``."""
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--slide", type=Path, required=True, help="whole-slide image file")
    inputs.add_argument(
        "--features", type=Path, default=None, help="the slide's feature .h5 with coords (needed with --checkpoint)"
    )
    source = inputs.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--scores", type=Path, help="per-tile scores: predict-mil attention .h5, or CSV with x, y and --score-key"
    )
    source.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        help="train-mil checkpoints whose attention is drawn. Several are averaged",
    )
    inputs.add_argument(
        "--score-key", default="attention", help="dataset or column with the scores (default: attention)"
    )
    inputs.add_argument(
        "--patch-size-level0", type=float, default=None, help="tile side in level-0 pixels when the inputs lack it"
    )
    inputs.add_argument("--device", default="cpu", help="torch device for --checkpoint (default: cpu)")

    drawing = parser.add_argument_group("drawing")
    drawing.add_argument(
        "--max-size",
        type=int,
        default=2048,
        help="maximum length of the thumbnail's longest side, pixels (default: 2048)",
    )
    drawing.add_argument("--cmap", default="turbo", help="matplotlib colour map (default: turbo)")
    drawing.add_argument(
        "--alpha", type=float, default=0.5, help="opacity of the colour over the thumbnail, 0-1 (default: 0.5)"
    )
    drawing.add_argument(
        "--normalize",
        choices=("rank", "minmax", "none"),
        default="rank",
        help="score-to-colour mapping: percentile rank, min-max, or raw values clipped to [0, 1] (default: rank)",
    )

    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    """Draw the heatmap and write the exports. Return the exit status."""
    from virchow.downstream.heatmap import load_tile_scores, write_heatmap
    from virchow.errors import ConfigError

    if args.checkpoint:
        if args.features is None:
            raise ConfigError("--checkpoint needs --features, the slide's feature file")
        tiles = _attention_from_checkpoints(args.checkpoint, args.features, args.device, args.patch_size_level0)
    else:
        tiles = load_tile_scores(
            args.features, args.scores, score_key=args.score_key, patch_size_level0=args.patch_size_level0
        )
    write_heatmap(
        args.slide,
        tiles,
        args.out,
        max_size=args.max_size,
        cmap=args.cmap,
        alpha=args.alpha,
        normalization=args.normalize,
    )
    return 0


def _attention_from_checkpoints(checkpoints: list[Path], features: Path, device: str, patch_size: float | None):
    """Run the checkpoints on one slide's features and return its attention as tile scores."""
    from virchow.downstream.heatmap import TileScores
    from virchow.downstream.mil.bags import Bag
    from virchow.downstream.mil.predict import load_checkpoints, predict_bags
    from virchow.downstream.slide_features import feature_shape, slide_id_from_name
    from virchow.embed.device import resolve_device
    from virchow.errors import DataError

    slide_id = slide_id_from_name(features.name)
    bag = Bag(slide_id, (slide_id,), (features,), (feature_shape(features)[0],))
    prediction = next(predict_bags(load_checkpoints(checkpoints), [bag], resolve_device(device)))
    slide = prediction.slides[0]
    if slide.coords is None:
        raise DataError(f"{features} has no 'coords' dataset, so tiles cannot be placed")
    size = patch_size or slide.patch_size_level0
    if not size:
        raise DataError(f"{features} does not store the tile size. Pass --patch-size-level0 (level-0 pixels)")
    return TileScores(slide.coords, slide.attention, float(size), "attention")
