"""The registered architectures equal timm's vit_huge_patch14_224 with the official kwargs."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import GluMlp, SwiGLUPacked

from virchow.errors import UnknownModelError
from virchow.models import build_model, get_model_spec, list_models

OFFICIAL_KWARGS = dict(
    img_size=224,
    init_values=1e-5,
    num_classes=0,
    mlp_ratio=5.3375,
    global_pool="",
    dynamic_img_size=True,
    mlp_layer=SwiGLUPacked,
    act_layer=torch.nn.SiLU,
)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_virchow_full_size_parameter_count():
    model = build_model(get_model_spec("virchow"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == 631_229_184


def test_virchow_matches_timm_official_kwargs():
    ours = _shapes(build_model(get_model_spec("virchow"), device="meta"))
    with torch.device("meta"):
        reference = _shapes(timm.create_model("vit_huge_patch14_224", pretrained=False, **OFFICIAL_KWARGS))
    assert ours == reference
    assert ours["pos_embed"] == (1, 257, 1280)
    assert ours["blocks.31.mlp.fc1.weight"] == (6832, 1280)
    assert ours["blocks.31.mlp.fc2.weight"] == (1280, 3416)
    assert all(f"blocks.{i}.ls1.gamma" in ours and f"blocks.{i}.ls2.gamma" in ours for i in range(32))
    assert "reg_token" not in ours


def test_virchow2_has_register_tokens():
    ours = _shapes(build_model(get_model_spec("virchow2"), device="meta"))
    with torch.device("meta"):
        reference = _shapes(timm.create_model("vit_huge_patch14_224", pretrained=False, reg_tokens=4, **OFFICIAL_KWARGS))
    assert ours == reference
    assert ours["reg_token"] == (1, 4, 1280)
    assert ours["pos_embed"] == (1, 261, 1280)


@pytest.mark.parametrize("name", ["virchow", "virchow2", "virchow-test", "virchow2-test"])
def test_spec_declares_everything(name):
    spec = get_model_spec(name)
    assert spec.architecture == "vit_huge_patch14_224"
    assert spec.model_args["mlp_ratio"] == 5.3375
    assert spec.model_args["init_values"] == 1e-5
    assert spec.model_args["global_pool"] == ""
    assert spec.model_args["dynamic_img_size"] is True
    assert spec.preprocess.interpolation == "bicubic"
    assert spec.preprocess.mean == (0.485, 0.456, 0.406)
    assert spec.license
    assert spec.num_prefix_tokens == (5 if "2" in name else 1)


def test_official_repositories():
    assert get_model_spec("virchow").default_weights == "hf-hub:paige-ai/Virchow"
    assert get_model_spec("virchow2").default_weights == "hf-hub:paige-ai/Virchow2"


@pytest.mark.parametrize("name", ["virchow-test", "virchow2-test"])
def test_test_variant_runs_same_code_path(name):
    spec = get_model_spec(name)
    model = build_model(spec)
    tokens = model(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 256 + spec.num_prefix_tokens, spec.embed_dim)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GluMlp)
    assert mlp.fc1.out_features == 2 * mlp.fc2.in_features


def test_list_models_includes_both_versions():
    names = list_models()
    assert {"virchow", "virchow2", "virchow-test", "virchow2-test"} <= set(names)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError) as info:
        get_model_spec("virchow3")
    message = str(info.value)
    assert "virchow3" in message
    for name in list_models():
        assert name in message
