"""ABMIL and Agata: shapes, padding masks, the Agata formulas, empty and very large bags."""

from __future__ import annotations

import pytest
import torch

from virchow.downstream.mil.abmil import GatedABMIL
from virchow.downstream.mil.agata import Agata
from virchow.errors import EmptyBagError

MODELS = {
    "abmil": lambda f, k: GatedABMIL(f, k, hidden_dim=32, attention_dim=16, dropout=0.0),
    "agata": lambda f, k: Agata(f, k, key_dim=32, value_dim=24, n_queries=2, scaled_attention=True),
}


@pytest.mark.parametrize("kind", MODELS)
def test_outputs_and_attention(kind):
    torch.manual_seed(0)
    model = MODELS[kind](10, [2, 3]).eval()
    out = model(torch.randn(4, 7, 10))
    assert [tuple(t.shape) for t in out.logits] == [(4, 2), (4, 3)]
    assert out.attention.shape == (4, 7)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(4), atol=1e-6)
    assert bool((out.attention >= 0).all())


@pytest.mark.parametrize("kind", MODELS)
def test_padding_matches_unpadded(kind):
    torch.manual_seed(0)
    model = MODELS[kind](10, [2]).eval()
    short, long = torch.randn(1, 3, 10), torch.randn(1, 6, 10)
    padded = torch.cat([torch.cat([short, torch.full((1, 3, 10), 99.0)], dim=1), long])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 3:] = True

    batched = model(padded, mask)
    alone = model(short)
    assert torch.allclose(batched.logits[0][0], alone.logits[0][0], atol=1e-5)
    assert torch.allclose(batched.attention[0, :3], alone.attention[0], atol=1e-6)
    assert bool((batched.attention[0, 3:] == 0).all())
    assert torch.allclose(batched.logits[0][1], model(long).logits[0][0], atol=1e-5)


def test_agata_follows_reference_formulas():
    torch.manual_seed(0)
    model = Agata(6, [2], key_dim=5, value_dim=4, n_queries=1, scaled_attention=True).eval()
    x = torch.randn(1, 9, 6)
    out = model(x)

    keys = torch.relu(x @ model.key.weight.T + model.key.bias)
    values = torch.relu(keys @ model.value.weight.T + model.value.bias)
    scores = (keys @ model.queries.weight.T) / 5**0.5
    weights = torch.softmax(scores, dim=1)
    embedding = (weights * values).sum(dim=1)
    assert model.queries.bias is None
    assert torch.allclose(out.attention, weights[..., 0], atol=1e-6)
    assert torch.allclose(out.embedding, embedding, atol=1e-6)
    assert torch.allclose(out.logits[0], model.heads[0](embedding), atol=1e-6)


@pytest.mark.parametrize("kind", MODELS)
def test_empty_bag_rejected(kind):
    model = MODELS[kind](10, [2])
    with pytest.raises(EmptyBagError, match="no tiles"):
        model(torch.zeros(1, 0, 10))
    with pytest.raises(EmptyBagError, match="batch positions \\[1\\]"):
        model(torch.zeros(2, 3, 10), torch.tensor([[False, True, True], [True, True, True]]))


@pytest.fixture(scope="module")
def bag_100k() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.empty(1, 100_000, 2560).uniform_(-1.0, 1.0, generator=generator)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["abmil", "agata"])
def test_100k_tile_bag_forward(kind, bag_100k):
    """A 100k x 2560 bag (1 GB of float32) goes through the default-size aggregator on the CPU."""
    model = GatedABMIL(2560, [2]) if kind == "abmil" else Agata(2560, [2])
    with torch.inference_mode():
        out = model.eval()(bag_100k)
    assert out.attention.shape == (1, 100_000)
    assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-4)
    assert bool(torch.isfinite(out.logits[0]).all())


@pytest.mark.parametrize("kind", MODELS)
def test_100k_tile_bag_training_step(kind):
    torch.manual_seed(0)
    model = MODELS[kind](16, [2])
    out = model(torch.randn(1, 100_000, 16))
    loss = torch.nn.functional.cross_entropy(out.logits[0], torch.tensor([1]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
