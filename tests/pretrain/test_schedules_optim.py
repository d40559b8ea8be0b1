"""Schedules, parameter groups with layer-wise decay, and the small registered variants."""

from __future__ import annotations

import math

import pytest
import torch

from tests.pretrain.conftest import TILE_DATA, TINY
from virchow.models import build_model, get_model_spec
from virchow.pretrain.config import load_config
from virchow.pretrain.meta_arch import build_networks, update_teacher
from virchow.pretrain.optim import apply_schedules, build_optimizer, layer_id, parameter_multipliers
from virchow.pretrain.schedules import CosineSchedule, LinearWarmup, build_schedules, scaled_lr


def test_cosine_schedule_warmup_then_cosine():
    schedule = CosineSchedule(base=1.0, final=0.0, total=110, warmup=10)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == 0.0
    assert schedule(500) == 0.0


def test_linear_warmup_holds_end_value():
    schedule = LinearWarmup(0.04, 0.07, 30)
    assert schedule(0) == pytest.approx(0.04)
    assert schedule(15) == pytest.approx(0.055)
    assert schedule(30) == schedule(1000) == pytest.approx(0.07)


def test_lr_scaling_rules():
    cfg = load_config(None, [*TILE_DATA, "optim.lr=1e-3"])
    assert scaled_lr(cfg, 4096) == pytest.approx(2e-3)
    cfg = load_config(None, [*TILE_DATA, "optim.lr=1e-3", "optim.lr_scaling=linear"])
    assert scaled_lr(cfg, 256) == pytest.approx(2.5e-4)


def test_prototypes_frozen_then_follow_lr():
    cfg = load_config(None, [*TILE_DATA, "optim.freeze_last_layer_iterations=10", "optim.warmup_iterations=5"])
    schedules = build_schedules(cfg, 1024)
    assert schedules.last_layer_lr(9) == 0.0
    assert schedules.last_layer_lr(10) == schedules.lr(10)


def test_layer_ids():
    assert layer_id("backbone.pos_embed", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("mask_token", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13
    assert layer_id("dino_head.mlp.0.weight", 12) == 13


def test_parameter_multipliers():
    cfg = load_config(None, [*TILE_DATA, "optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2"])
    depth = 2
    assert parameter_multipliers("backbone.blocks.1.attn.qkv.weight", cfg, depth) == (0.5, 1.0, False)
    assert parameter_multipliers("backbone.blocks.0.attn.qkv.weight", cfg, depth) == (0.25, 1.0, False)
    lr, wd, _ = parameter_multipliers("backbone.patch_embed.proj.weight", cfg, depth)
    assert lr == pytest.approx(0.125 * 0.2)
    assert wd == 1.0
    assert parameter_multipliers("backbone.blocks.0.ls1.gamma", cfg, depth)[1] == 0.0
    assert parameter_multipliers("backbone.blocks.0.norm1.weight", cfg, depth)[1] == 0.0
    assert parameter_multipliers("backbone.cls_token", cfg, depth)[1] == 0.0
    assert parameter_multipliers("dino_head.mlp.0.bias", cfg, depth) == (1.0, 0.0, False)
    assert parameter_multipliers("dino_head.prototypes", cfg, depth) == (1.0, 1.0, True)


def test_optimizer_groups_follow_schedules():
    cfg = load_config(None, [*TINY, *TILE_DATA, "optim.layerwise_decay=0.5", "optim.freeze_last_layer_iterations=3"])
    student, _, _ = build_networks(cfg)
    optimizer = build_optimizer(student.named_parameters(), cfg, depth=2)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len([p for p in student.parameters() if p.requires_grad])
    schedules = build_schedules(cfg, 4)
    lr, wd = apply_schedules(optimizer, schedules, 2)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_prototypes"] else lr * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(wd * group["wd_multiplier"])


def test_teacher_ema_update():
    cfg = load_config(None, [*TINY, *TILE_DATA])
    student, teacher, _ = build_networks(cfg)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    update_teacher(student, teacher, 0.9)
    for old, new, target in zip(before, teacher.parameters(), student.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * target, atol=1e-6)


def test_teacher_has_no_drop_path_or_gradients():
    cfg = load_config(None, [*TINY, *TILE_DATA, "model.drop_path_rate=0.3"])
    student, teacher, _ = build_networks(cfg)
    assert student.backbone.blocks[1].drop_path1.drop_prob == pytest.approx(0.3)
    assert teacher.backbone.blocks[1].drop_path1.drop_prob == 0.0
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(("name", "width", "millions"), [("vit-s14-swiglu", 384, 21.6), ("vit-b14-swiglu", 768, 85.7)])
def test_small_variants_build_with_virchow_layers(name, width, millions):
    spec = get_model_spec(name)
    model = build_model(spec, device="meta")
    fc1 = model.blocks[0].mlp.fc1
    assert fc1.out_features % 2 == 0  # the packed SwiGLU splits fc1 into two halves
    assert model.blocks[0].ls1.gamma.shape == (width,)
    assert math.isclose(sum(p.numel() for p in model.parameters()) / 1e6, millions, rel_tol=0.01)
    assert spec.embed_dim == width
    assert spec.default_weights is None
