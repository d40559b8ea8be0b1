"""Heatmaps on the CMU-1-Small-Region slide: image size, cell placement, CSV and GeoJSON exports."""

from __future__ import annotations

import json

import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tests.downstream.helpers import run_command, write_slide_h5
from virchow.cli import heatmap as heatmap_command
from virchow.downstream.heatmap import normalize_scores
from virchow.downstream.mil.model import MILCheckpoint, MILModelConfig, build_model
from virchow.errors import DataError
from virchow.wsi.qc import thumbnail
from virchow.wsi.readers import open_slide

TILE = 224
ALPHA = 0.6
MAX_SIZE = 512


@pytest.fixture(scope="module")
def slide_thumbnail(sample_slide):
    with open_slide(sample_slide) as reader:
        image, downsample = thumbnail(reader, MAX_SIZE)
    return np.asarray(image.convert("RGB")), downsample


@pytest.fixture
def grid(tmp_path):
    """Features of a 4 x 5 tile grid starting at level-0 (448, 672), and attention scores in shuffled order."""
    xs, ys = np.meshgrid(np.arange(2, 6) * TILE, np.arange(3, 8) * TILE)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)
    features = tmp_path / "CMU-1-Small-Region.h5"
    write_slide_h5(features, np.random.default_rng(0).normal(size=(len(coords), 16)), tile_size=TILE, coords=coords)

    scores = np.linspace(0.0, 1.0, len(coords))
    order = np.random.default_rng(1).permutation(len(coords))
    scores_path = tmp_path / "attention.h5"
    with h5py.File(scores_path, "w") as handle:
        handle.create_dataset("attention", data=scores[order])
        handle.create_dataset("coords", data=coords[order])
    return {"coords": coords, "scores": scores, "features": features, "scores_path": scores_path}


def _run(sample_slide, out, *source):
    argv = [
        "--slide",
        str(sample_slide),
        *source,
        "--max-size",
        str(MAX_SIZE),
        "--alpha",
        str(ALPHA),
        "--normalize",
        "minmax",
        "--cmap",
        "viridis",
        "--out",
        str(out),
    ]
    assert run_command(heatmap_command, argv) == 0
    return np.asarray(Image.open(out / "CMU-1-Small-Region_heatmap.png").convert("RGB")).astype(int)


def test_heatmap_cells_on_tile_coordinates(sample_slide, slide_thumbnail, grid, tmp_path):
    base, downsample = slide_thumbnail
    heatmap = _run(
        sample_slide, tmp_path / "out", "--features", str(grid["features"]), "--scores", str(grid["scores_path"])
    )
    assert heatmap.shape == base.shape

    colours = matplotlib.colormaps["viridis"](normalize_scores(grid["scores"], "minmax"))[:, :3] * 255
    for (x, y), colour in zip(grid["coords"], colours, strict=True):
        col, row = int((x + TILE / 2) / downsample), int((y + TILE / 2) / downsample)
        expected = (1 - ALPHA) * base[row, col] + ALPHA * colour
        assert np.abs(heatmap[row, col] - expected).max() <= 1, (x, y)

    # pixels outside the grid keep the thumbnail colours; the changed area is the grid's extent
    changed = np.abs(heatmap - base.astype(int)).max(axis=2) > 0
    rows, cols = np.nonzero(changed)
    assert abs(cols.min() - 2 * TILE / downsample) <= 1
    assert abs(cols.max() + 1 - 6 * TILE / downsample) <= 1
    assert abs(rows.min() - 3 * TILE / downsample) <= 1
    assert abs(rows.max() + 1 - 8 * TILE / downsample) <= 1
    outside = np.ones_like(changed)
    outside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = False
    assert np.array_equal(heatmap[outside], base[outside])


def test_heatmap_exports(sample_slide, grid, tmp_path):
    _run(sample_slide, tmp_path, "--features", str(grid["features"]), "--scores", str(grid["scores_path"]))

    table = pd.read_csv(tmp_path / "CMU-1-Small-Region_tiles.csv")
    assert list(table.columns) == ["x", "y", "attention"]
    assert np.array_equal(table[["x", "y"]].to_numpy(), grid["coords"])
    assert np.allclose(table["attention"], grid["scores"])

    collection = json.loads((tmp_path / "CMU-1-Small-Region_tiles.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == 20
    first = collection["features"][0]
    x, y = grid["coords"][0]
    assert first["geometry"]["type"] == "Polygon"
    assert first["geometry"]["coordinates"] == [[[x, y], [x + TILE, y], [x + TILE, y + TILE], [x, y + TILE], [x, y]]]
    assert first["properties"]["objectType"] == "tile"
    assert first["properties"]["measurements"] == {"attention": pytest.approx(grid["scores"][0])}


def test_heatmap_from_checkpoint(sample_slide, slide_thumbnail, grid, tmp_path):
    config = MILModelConfig(kind="agata", in_features=16, n_classes=(2,), hidden_dim=8, dropout=0.0)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    MILCheckpoint(config, build_model(config).state_dict(), ["label"], [["a", "b"]]).save(checkpoint)

    heatmap = _run(sample_slide, tmp_path / "out", "--features", str(grid["features"]), "--checkpoint", str(checkpoint))
    assert heatmap.shape == slide_thumbnail[0].shape
    table = pd.read_csv(tmp_path / "out" / "CMU-1-Small-Region_tiles.csv")
    assert table["attention"].sum() == pytest.approx(1.0, abs=1e-4)


def test_scores_must_cover_every_tile(sample_slide, grid, tmp_path):
    partial = tmp_path / "partial.csv"
    pd.DataFrame({"x": grid["coords"][:5, 0], "y": grid["coords"][:5, 1], "attention": 1.0}).to_csv(
        partial, index=False
    )
    with pytest.raises(DataError, match="no score for 15 tiles"):
        run_command(
            heatmap_command,
            [
                "--slide",
                str(sample_slide),
                "--features",
                str(grid["features"]),
                "--scores",
                str(partial),
                "--out",
                str(tmp_path),
            ],
        )


def test_rank_normalisation():
    assert normalize_scores(np.array([0.3, 0.1, 0.2, 0.2]), "rank").tolist() == [1.0, 0.0, 0.5, 0.5]
    assert normalize_scores(np.array([2.0, 2.0]), "minmax").tolist() == [0.5, 0.5]
