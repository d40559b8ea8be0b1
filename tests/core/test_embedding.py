"""Embedding kinds, register-token exclusion, precision agreement and the NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virchow.embed import Embedder
from virchow.errors import ConfigError, NonFiniteEmbeddingError
from virchow.models import EMBEDDING_KINDS, embedding_shape, get_model_spec, load_model, pool_tokens


@pytest.mark.parametrize(
    ("kind", "shape"), [("cls+mean", (2560,)), ("cls", (1280,)), ("mean", (1280,)), ("patch_tokens", (256, 1280))]
)
@pytest.mark.parametrize("name", ["virchow", "virchow2"])
def test_full_size_embedding_shapes(name, kind, shape):
    spec = get_model_spec(name)
    tokens = torch.randn(2, 256 + spec.num_prefix_tokens, 1280)
    assert embedding_shape(kind, spec.embed_dim, spec.num_patch_tokens) == shape
    assert tuple(pool_tokens(tokens, kind, spec.num_prefix_tokens).shape) == (2, *shape)


@pytest.mark.parametrize("kind", EMBEDDING_KINDS)
@pytest.mark.parametrize("name", ["virchow-test", "virchow2-test"])
def test_embedder_output_shape(name, kind):
    embedder = Embedder(load_model(name, "random:0"), kind=kind, device="cpu", precision="fp32")
    out = embedder.embed_tiles(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    assert tuple(out.shape) == (2, *embedder.output_shape)
    assert out.dtype == torch.float32


def _known_tokens(num_registers: int) -> torch.Tensor:
    """Class token 1, register tokens 1000, patch tokens 2 and 4 alternating (mean 3)."""
    tokens = torch.empty(1, 1 + num_registers + 256, 8)
    tokens[:, 0] = 1.0
    tokens[:, 1 : 1 + num_registers] = 1000.0
    tokens[:, 1 + num_registers :: 2] = 2.0
    tokens[:, 2 + num_registers :: 2] = 4.0
    return tokens


def test_registers_excluded_from_mean():
    embedding = pool_tokens(_known_tokens(4), "cls+mean", num_prefix_tokens=5)
    assert torch.all(embedding[0, :8] == 1.0)
    assert torch.all(embedding[0, 8:] == 3.0)


def test_virchow2_embedder_excludes_registers(monkeypatch):
    loaded = load_model("virchow2-test", "random:0")
    embedder = Embedder(loaded, kind="mean", device="cpu", precision="fp32")
    monkeypatch.setattr(embedder, "_forward", lambda batch: _known_tokens(4).expand(batch.shape[0], -1, -1))
    out = embedder.embed_tiles(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    assert torch.all(out == 3.0)


def test_virchow1_embedder_keeps_all_patches(monkeypatch):
    embedder = Embedder(load_model("virchow-test", "random:0"), kind="mean", device="cpu", precision="fp32")
    monkeypatch.setattr(embedder, "_forward", lambda batch: _known_tokens(0).expand(batch.shape[0], -1, -1))
    assert torch.all(embedder.embed_tiles(np.zeros((1, 224, 224, 3), dtype=np.uint8)) == 3.0)


def test_unknown_kind():
    with pytest.raises(ConfigError, match="cls\\+mean"):
        Embedder(load_model("virchow-test", "random:0"), kind="avg", device="cpu")


def _large_layerscale_model(name: str):
    loaded = load_model(name, "random:0")
    with torch.no_grad():
        for block in loaded.model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    return loaded


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", ["virchow-test", "virchow2-test"])
def test_reduced_precision_agrees_with_fp32(name, precision):
    loaded = _large_layerscale_model(name)
    torch.manual_seed(0)
    tiles = torch.randint(0, 256, (4, 224, 224, 3), dtype=torch.uint8)
    reference = Embedder(loaded, device="cpu", precision="fp32").embed_tiles(tiles)
    reduced = Embedder(loaded, device="cpu", precision=precision).embed_tiles(tiles)

    assert reduced.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(reference, reduced, dim=-1)
    assert cosine.min().item() >= 0.999
    assert (reference - reduced).abs().max().item() > 0  # the autocast path really ran


def test_non_finite_output_names_positions(monkeypatch):
    embedder = Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="fp32")
    real_forward = embedder._forward

    def poisoned(batch):
        tokens = real_forward(batch)
        tokens[1, 3, 0] = float("nan")
        tokens[3, 0, 0] = float("inf")
        return tokens

    monkeypatch.setattr(embedder, "_forward", poisoned)
    with pytest.raises(NonFiniteEmbeddingError) as info:
        embedder.embed_tiles(np.zeros((4, 224, 224, 3), dtype=np.uint8))
    assert info.value.positions == [1, 3]
    assert "[1, 3]" in str(info.value)


def test_batches_larger_than_batch_size(monkeypatch):
    embedder = Embedder(load_model("virchow-test", "random:0"), device="cpu", precision="fp32", batch_size=3)
    tiles = torch.randint(0, 256, (7, 224, 224, 3), dtype=torch.uint8)
    together = embedder.embed_tiles(tiles)
    one_by_one = torch.cat([embedder.embed_tiles(tiles[i : i + 1]) for i in range(7)])
    assert torch.allclose(together, one_by_one, atol=1e-5)
