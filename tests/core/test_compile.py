"""The compiled CPU path gives the same embeddings as the eager model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virchow.embed import Embedder
from virchow.embed.embedder import COMPILE_MIN_TILES
from virchow.models import load_model


@pytest.mark.slow
def test_compiled_matches_eager_and_pads_last_batch():
    loaded = load_model("virchow-test", "random:0")
    tiles = torch.randint(0, 256, (5, 224, 224, 3), dtype=torch.uint8)
    eager = Embedder(loaded, device="cpu", precision="bf16", batch_size=4, compile="off").embed_tiles(tiles)
    compiled_embedder = Embedder(loaded, device="cpu", precision="bf16", batch_size=4, compile="on")

    compiled = compiled_embedder.embed_tiles(tiles)  # 4 + a padded batch of 1

    assert compiled_embedder.compiled
    assert compiled.shape == eager.shape
    cosine = torch.nn.functional.cosine_similarity(compiled, eager, dim=-1)
    assert cosine.min().item() >= 0.999


def test_auto_compiles_only_large_cpu_bf16_jobs(monkeypatch):
    calls = []
    embedder = Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="bf16", compile="auto")
    monkeypatch.setattr(embedder, "_compile", lambda: calls.append(True))

    embedder.prepare(COMPILE_MIN_TILES - 1)
    assert calls == []
    embedder.prepare(COMPILE_MIN_TILES)
    assert calls == [True]


def test_auto_never_compiles_fp32(monkeypatch):
    embedder = Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="fp32", compile="auto")
    monkeypatch.setattr(embedder, "_compile", lambda: pytest.fail("compiled an fp32 job"))
    embedder.prepare(10 * COMPILE_MIN_TILES)
    assert np.prod(embedder.output_shape) == 320
