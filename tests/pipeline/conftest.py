"""Fixtures of the slide pipeline tests: a pixel-recording embedder and the test model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from virchow.embed import Embedder
from virchow.models import load_model

WSI = Path(__file__).parents[1] / "data" / "wsi"


class PixelEmbedder:
    """Stands in for the model: the 'embedding' of a tile is its raw pixels, so tests can see them."""

    batch_size = 16
    output_shape = (224 * 224 * 3,)

    def prepare(self, num_images: int) -> None:
        del num_images

    def embed_tiles(self, tiles: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(tiles).reshape(len(tiles), -1).astype(np.float32))

    def metadata(self) -> dict:
        return {"model": "pixels", "weights_source": "none", "weights_sha256": "", "weights_random": False,
                "embedding_kind": "pixels", "precision": "fp32"}


@pytest.fixture
def pixel_embedder() -> PixelEmbedder:
    return PixelEmbedder()


@pytest.fixture(scope="session")
def test_embedder() -> Embedder:
    return Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="fp32", batch_size=16)


@pytest.fixture
def slide_copies(tmp_path) -> Path:
    """A folder with three copies of the sample slide."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c"):
        shutil.copyfile(WSI / "CMU-1-Small-Region.svs", folder / f"{name}.svs")
    return folder
