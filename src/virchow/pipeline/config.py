"""Settings of an ``embed-slides`` run and the fingerprint that decides whether output is reusable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from virchow.errors import ConfigError
from virchow.wsi.tiling import DEFAULT_MIN_TISSUE

TissueChoice = Literal["otsu", "none", "mask"]

# Embedder metadata that changes the numbers in a feature file. Device and compilation do not.
_OUTPUT_METADATA = ("model", "weights_source", "weights_sha256", "weights_random", "embedding_kind", "precision")


@dataclass(frozen=True)
class SlideJobConfig:
    """Tiling and storage settings of a run.

    Attributes:
        target_mpp: tile pixel size in um/px (Virchow was trained at 0.5).
        tile_size: tile side in pixels at ``target_mpp``.
        overlap: pixels shared by neighbouring tiles, at ``target_mpp``.
        min_tissue: minimum fraction of a tile's area that must be tissue for the tile to be kept.
        edge: ``drop`` keeps only tiles inside the slide; ``pad`` also keeps edge tiles, padded white.
        tissue: ``otsu`` detection, ``none`` (whole slide), or ``mask`` (per-slide user masks).
        assume_mpp: pixel size used for slides whose metadata has none, recorded in the output.
        float16: store features as float16 (they are computed in float32).
        read_workers: threads reading and cutting regions while the model runs.
        region_tiles: tiles per side of one region read.
        qc: write the QC thumbnail and the tissue GeoJSON of each slide.
    """

    target_mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = DEFAULT_MIN_TISSUE
    edge: Literal["drop", "pad"] = "drop"
    tissue: TissueChoice = "otsu"
    assume_mpp: float | None = None
    float16: bool = False
    read_workers: int = 2
    region_tiles: int = 4
    qc: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.target_mpp < 100:
            raise ConfigError(f"target mpp {self.target_mpp} must be in (0, 100) um/px")
        if self.tile_size < 14:
            raise ConfigError(f"tile size {self.tile_size} must be at least 14 px")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"overlap {self.overlap} must be in [0, tile size {self.tile_size})")
        if not 0 <= self.min_tissue <= 1:
            raise ConfigError(f"min tissue fraction {self.min_tissue} must be in [0, 1]")
        if self.edge not in ("drop", "pad"):
            raise ConfigError(f"edge mode {self.edge!r} must be 'drop' or 'pad'")
        if self.tissue not in ("otsu", "none", "mask"):
            raise ConfigError(f"tissue method {self.tissue!r} must be otsu, none or mask")
        if self.assume_mpp is not None and not 0 < self.assume_mpp < 100:
            raise ConfigError(f"--assume-mpp {self.assume_mpp} must be in (0, 100) um/px")
        if self.read_workers < 1 or self.region_tiles < 1:
            raise ConfigError("read workers and region tiles must be at least 1")

    def output_settings(self, embedder_metadata: dict[str, Any]) -> dict[str, Any]:
        """Return every setting that changes a slide's output file."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("read_workers", "region_tiles", "qc")}
        settings.update({key: embedder_metadata.get(key) for key in _OUTPUT_METADATA})
        return settings

    def fingerprint(self, embedder_metadata: dict[str, Any]) -> str:
        """Return a short hash of :meth:`output_settings`; equal hashes mean reusable output."""
        text = json.dumps(self.output_settings(embedder_metadata), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
