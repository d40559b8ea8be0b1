"""Trainable parameters per mode, layer-wise learning rates, and the exported backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from virchow.errors import ConfigError
from virchow.finetune import TileClassifier, apply_mode, export_classifier, load_head
from virchow.finetune.modes import merged_backbone_state_dict, param_groups
from virchow.finetune.schedule import WarmupCosine
from virchow.models import load_model

from .conftest import make_config


def _classifier(tmp_path: Path, mode: str, **overrides: object) -> TileClassifier:
    loaded = load_model("virchow-test", "random:0")
    classifier = TileClassifier(loaded.model, loaded.spec, "cls+mean", num_classes=3)
    apply_mode(classifier, make_config(tmp_path, tmp_path / "run", mode=mode, **overrides))
    return classifier


def _trainable(classifier: TileClassifier) -> dict[str, int]:
    return {name: p.numel() for name, p in classifier.named_parameters() if p.requires_grad}


def test_lora_trains_only_adapters_and_head(tmp_path: Path) -> None:
    classifier = _classifier(tmp_path, "lora", lora_rank=4)
    trainable = _trainable(classifier)
    adapters = {name for name in trainable if ".lora_A." in name or ".lora_B." in name}
    assert set(trainable) - adapters == {"head.weight", "head.bias"}
    # 2 blocks x (qkv, proj, fc1, fc2), each with an A and a B matrix.
    assert len(adapters) == 2 * 4 * 2
    assert not any(name.startswith("backbone.patch_embed") for name in adapters)
    width, fc1_out, classes = 160, 854, 3
    per_block = 4 * (width + 3 * width) + 4 * (width + width) + 4 * (width + fc1_out) + 4 * (fc1_out // 2 + width)
    assert sum(trainable.values()) == 2 * per_block + classes * 2 * width + classes


def test_head_mode_trains_only_head(tmp_path: Path) -> None:
    classifier = _classifier(tmp_path, "head")
    assert set(_trainable(classifier)) == {"head.weight", "head.bias"}
    classifier.train()
    assert not classifier.backbone.training


def test_last_n_trains_final_blocks_and_norm(tmp_path: Path) -> None:
    trainable = _trainable(_classifier(tmp_path, "last-1"))
    assert any(name.startswith("backbone.blocks.1.") for name in trainable)
    assert not any(name.startswith("backbone.blocks.0.") for name in trainable)
    assert {"backbone.norm.weight", "backbone.norm.bias", "head.weight"} <= set(trainable)
    assert "backbone.pos_embed" not in trainable


def test_last_n_beyond_depth_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="requests 3 blocks"):
        _classifier(tmp_path, "last-3")


def test_full_mode_trains_everything(tmp_path: Path) -> None:
    classifier = _classifier(tmp_path, "full")
    assert all(p.requires_grad for p in classifier.parameters())


def test_layer_decay_scales_by_depth(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "run", mode="full", layer_decay=0.5, weight_decay=0.05)
    loaded = load_model("virchow-test", "random:0")
    classifier = TileClassifier(loaded.model, loaded.spec, "cls+mean", num_classes=3)
    apply_mode(classifier, config)
    scales = {}
    for group in param_groups(classifier, config):
        for name in group["names"]:
            scales[name] = (group["lr_scale"], group["weight_decay"])
    assert scales["head.weight"] == (1.0, 0.05)
    assert scales["backbone.norm.weight"] == (1.0, 0.0)
    assert scales["backbone.blocks.1.attn.qkv.weight"] == (0.5, 0.05)
    assert scales["backbone.blocks.0.mlp.fc1.weight"] == (0.25, 0.05)
    assert scales["backbone.blocks.0.mlp.fc1.bias"] == (0.25, 0.0)
    assert scales["backbone.patch_embed.proj.weight"] == (0.125, 0.05)
    assert scales["backbone.pos_embed"] == (0.125, 0.0)


def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosine(warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.5)
    assert schedule(1) == pytest.approx(1.0)
    assert schedule(2) == pytest.approx(1.0)
    assert schedule(6) == pytest.approx(0.55)
    assert schedule(10) == pytest.approx(0.1)


def _activate_blocks(classifier: TileClassifier) -> None:
    """Make the blocks matter: random weights come with LayerScale 1e-5, which hides them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in classifier.backbone.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        for name, param in classifier.backbone.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_exported_backbone_matches_memory(tmp_path: Path, mode: str) -> None:
    classifier = _classifier(tmp_path, mode)
    _activate_blocks(classifier)
    classifier.eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_tokens = classifier.backbone(images)
        expected_logits = classifier(images)

    export_dir = export_classifier(classifier, ["a", "b", "c"], tmp_path / "export")
    reloaded = load_model("virchow-test", str(export_dir))
    with torch.no_grad():
        tokens = reloaded.model(images)
    assert float((tokens - expected_tokens).abs().max()) <= 1e-5

    head = load_head(export_dir)
    assert head.classes == ["a", "b", "c"]
    assert head.embedding == "cls+mean"
    with torch.no_grad():
        embeddings = classifier.embed(images)
    assert float((head.logits(embeddings) - expected_logits).abs().max()) <= 1e-5


def test_merge_leaves_adapters_in_place(tmp_path: Path) -> None:
    classifier = _classifier(tmp_path, "lora")
    _activate_blocks(classifier)
    before = {name: p.clone() for name, p in classifier.backbone.named_parameters()}
    merged = merged_backbone_state_dict(classifier.backbone)
    assert not any("lora_" in key or "base_layer" in key for key in merged)
    base = classifier.backbone.blocks[0].attn.qkv.base_layer.weight
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], base)
    for name, param in classifier.backbone.named_parameters():
        assert torch.equal(param, before[name]), name
