"""Weight loading: every accepted source loads exactly, every wrong checkpoint fails clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from virchow.embed import Embedder
from virchow.errors import ConfigError, WeightsAccessError, WeightsFormatError, WeightsMismatchError
from virchow.models import build_model, get_model_spec, load_model, timm_kwargs
from virchow.models.export import hf_config, save_pretrained


def _random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(get_model_spec(name))
    with torch.no_grad():  # non-trivial LayerScale so that a wrong load shows in the output
        for block in model.blocks:
            block.ls1.gamma.normal_(0, 0.5)
            block.ls2.gamma.normal_(0, 0.5)
    return model


def _timm_embedding(name: str, state_dict: dict, batch: torch.Tensor) -> torch.Tensor:
    """Embed with a plain timm model as the model card does: CLS token + mean of patch tokens."""
    spec = get_model_spec(name)
    reference = timm.create_model(spec.architecture, pretrained=False, **timm_kwargs(spec)).eval()
    reference.load_state_dict(state_dict, strict=True)
    with torch.inference_mode():
        tokens = reference(batch)
    return torch.cat([tokens[:, 0], tokens[:, spec.num_prefix_tokens :].mean(1)], dim=-1)


def _embed(name: str, weights: str | Path, batch: torch.Tensor) -> torch.Tensor:
    loaded = load_model(name, str(weights))
    return Embedder(loaded, device="cpu", precision="fp32").embed_normalised(batch)


@pytest.mark.parametrize("name", ["virchow-test", "virchow2-test"])
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_hf_directory_loads_exactly(tmp_path, name, file_format):
    model = _random_model(name)
    save_pretrained(model, get_model_spec(name), tmp_path, file_format=file_format)
    batch = torch.randn(3, 3, 224, 224)

    ours = _embed(name, tmp_path, batch)
    reference = _timm_embedding(name, model.state_dict(), batch)

    assert ours.shape == (3, 2 * get_model_spec(name).embed_dim)
    assert (ours - reference).abs().max().item() <= 1e-6


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_single_checkpoint_file_loads(tmp_path, suffix):
    model = _random_model("virchow-test", seed=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    batch = torch.randn(2, 3, 224, 224)

    ours = _embed("virchow-test", path, batch)

    assert (ours - _timm_embedding("virchow-test", model.state_dict(), batch)).abs().max().item() <= 1e-6


def test_provenance_records_sha256(tmp_path):
    save_pretrained(_random_model("virchow-test"), get_model_spec("virchow-test"), tmp_path)
    loaded = load_model("virchow-test", str(tmp_path))
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()

    assert loaded.provenance.files == {"model.safetensors": digest}
    assert loaded.provenance.random is False
    assert loaded.provenance.source == str(tmp_path)
    assert loaded.provenance.to_attrs()["weights_sha256"] == f"model.safetensors={digest}"


def test_random_weights_are_labelled(caplog):
    loaded = load_model("virchow-test", "random:7")
    assert loaded.provenance.random is True
    assert loaded.provenance.seed == 7
    assert "RANDOM weights" in caplog.text


def test_random_seed_is_reproducible():
    first = load_model("virchow-test", "random:3").model.state_dict()
    second = load_model("virchow-test", "random:3").model.state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_invalid_random_seed():
    with pytest.raises(ConfigError, match="seed"):
        load_model("virchow-test", "random:abc")


@pytest.mark.slow
def test_full_size_tile_matches_timm(tmp_path):
    torch.manual_seed(0)
    spec = get_model_spec("virchow")
    model = build_model(spec)
    save_pretrained(model, spec, tmp_path)
    state_dict = model.state_dict()
    del model
    batch = torch.randn(1, 3, 224, 224)

    ours = _embed("virchow", tmp_path, batch)
    reference = _timm_embedding("virchow", state_dict, batch)

    assert ours.shape == (1, 2560)
    assert (ours - reference).abs().max().item() <= 1e-6


# Wrong checkpoints: each must raise the typed error with the likely cause.


def _plain_mlp_state_dict() -> dict:
    spec = get_model_spec("virchow-test")
    kwargs = {k: v for k, v in timm_kwargs(spec).items() if k not in ("mlp_layer", "act_layer")}
    return timm.create_model(spec.architecture, pretrained=False, **kwargs).state_dict()


def _no_layerscale_state_dict() -> dict:
    spec = get_model_spec("virchow-test")
    kwargs = {**timm_kwargs(spec), "init_values": None}
    return timm.create_model(spec.architecture, pretrained=False, **kwargs).state_dict()


def test_plain_mlp_checkpoint_names_swiglu(tmp_path):
    save_file(_plain_mlp_state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsMismatchError) as info:
        load_model("virchow-test", str(tmp_path / "plain.safetensors"))
    assert "SwiGLUPacked" in str(info.value)
    assert "854" in str(info.value)  # fc2 input width of a plain MLP against 427 for SwiGLU
    assert info.value.mismatched


def test_checkpoint_without_layerscale(tmp_path):
    save_file(_no_layerscale_state_dict(), str(tmp_path / "nols.safetensors"))
    with pytest.raises(WeightsMismatchError) as info:
        load_model("virchow-test", str(tmp_path / "nols.safetensors"))
    assert "LayerScale" in str(info.value)
    assert "blocks.0.ls1.gamma" in info.value.missing


def test_virchow2_weights_into_virchow(tmp_path):
    save_file(_random_model("virchow2-test").state_dict(), str(tmp_path / "v2.safetensors"))
    with pytest.raises(WeightsMismatchError) as info:
        load_model("virchow-test", str(tmp_path / "v2.safetensors"))
    assert "reg_token" in info.value.unexpected
    assert "virchow2-test" in str(info.value)


def test_virchow2_config_into_virchow_fails_before_reading(tmp_path):
    save_pretrained(_random_model("virchow2-test"), get_model_spec("virchow2-test"), tmp_path)
    with pytest.raises(WeightsMismatchError, match="register tokens"):
        load_model("virchow-test", str(tmp_path))


def test_full_size_mismatch_names_3416_and_6832():
    from virchow.models.checkpoint import check_state_dict

    expected = {k: v.shape for k, v in build_model(get_model_spec("virchow"), device="meta").state_dict().items()}
    with torch.device("meta"):
        kwargs = {k: v for k, v in timm_kwargs(get_model_spec("virchow")).items() if k not in ("mlp_layer", "act_layer")}
        plain = timm.create_model("vit_huge_patch14_224", pretrained=False, **kwargs).state_dict()
    with pytest.raises(WeightsMismatchError) as info:
        check_state_dict(expected, plain, model_name="virchow", source="test")
    assert "6832" in str(info.value)
    assert "3416" in str(info.value)


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_random_model("virchow-test").state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsFormatError, match="truncated"):
        load_model("virchow-test", str(path))


def test_truncated_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(_random_model("virchow-test").state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsFormatError):
        load_model("virchow-test", str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(WeightsFormatError):
        load_model("virchow-test", str(path))


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsFormatError, match="state dict"):
        load_model("virchow-test", str(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"0")
    with pytest.raises(WeightsFormatError, match="unknown checkpoint type"):
        load_model("virchow-test", str(path))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(get_model_spec("virchow-test"))))
    with pytest.raises(WeightsFormatError, match="model.safetensors"):
        load_model("virchow-test", str(tmp_path))


def test_missing_path_never_falls_back_to_random(tmp_path):
    with pytest.raises(WeightsAccessError, match="not found"):
        load_model("virchow-test", str(tmp_path / "absent"))


def test_test_variant_requires_explicit_weights():
    with pytest.raises(ConfigError, match="random"):
        load_model("virchow-test")


# Hugging Face Hub: offline, no cached copy, and a cached copy in the official layout.


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_offline_without_cache_explains_access(offline_hub):
    with pytest.raises(WeightsAccessError) as info:
        load_model("virchow")
    message = str(info.value)
    assert "paige-ai/Virchow" in message
    assert "HF_TOKEN" in message
    assert "--weights /path/to/dir" in message


def test_hub_cached_copy_loads_offline(offline_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = offline_hub / "models--lab--virchow-test" / "snapshots" / commit
    model = _random_model("virchow-test", seed=5)
    save_pretrained(model, get_model_spec("virchow-test"), snapshot)
    (offline_hub / "models--lab--virchow-test" / "refs").mkdir()
    (offline_hub / "models--lab--virchow-test" / "refs" / "main").write_text(commit)
    batch = torch.randn(1, 3, 224, 224)

    loaded = load_model("virchow-test", "hf-hub:lab/virchow-test")
    ours = Embedder(loaded, device="cpu", precision="fp32").embed_normalised(batch)

    assert loaded.provenance.source == f"hf-hub:lab/virchow-test@{commit}"
    assert (ours - _timm_embedding("virchow-test", model.state_dict(), batch)).abs().max().item() <= 1e-6
