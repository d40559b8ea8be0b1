"""End-to-end fine-tuning runs with the tiny test model: every mode, export, resume and the CLI."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from virchow.cli.main import main
from virchow.errors import ConfigError
from virchow.finetune import FinetuneResult, run_finetune
from virchow.finetune.checkpoint import load_checkpoint
from virchow.models import load_model

from .conftest import make_config, read_records

# Peak learning rates that reach full accuracy within 2 epochs of 3 steps on the separable tiles.
MODE_LR = {"head": 1e-2, "lora": 1e-2, "last-1": 1e-3, "full": 1e-3}


@pytest.fixture(scope="module")
def trained(separable_tiles: Path, tmp_path_factory: pytest.TempPathFactory):
    """Train each mode at most once per module and return (run directory, result)."""

    @functools.cache
    def train(mode: str) -> tuple[Path, FinetuneResult]:
        run_dir = tmp_path_factory.mktemp(f"run-{mode}")
        result = run_finetune(make_config(separable_tiles, run_dir, mode=mode, lr=MODE_LR[mode], epochs=2))
        return run_dir, result

    return train


@pytest.mark.parametrize("mode", list(MODE_LR))
def test_separable_task_is_learned(trained, mode: str) -> None:
    run_dir, result = trained(mode)
    assert result.finished
    assert [record["epoch"] for record in result.history] == [1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_accuracy"] == 1.0
    steps = read_records(run_dir, "step")
    assert len(steps) == 6
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_head_mode_keeps_backbone_bit_for_bit(trained) -> None:
    run_dir, _ = trained("head")
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    original = load_model("virchow-test", "random:0").model.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


def test_lora_checkpoint_holds_only_adapters_and_head(trained) -> None:
    run_dir, _ = trained("lora")
    trainable = load_checkpoint(run_dir / "last.pt")["trainable"]
    assert {"head.weight", "head.bias"} <= set(trainable)
    assert all(".lora_" in key for key in set(trainable) - {"head.weight", "head.bias"})
    assert any(float(value.abs().max()) > 0 for key, value in trainable.items() if ".lora_B." in key)


def test_export_holds_best_epoch(trained) -> None:
    run_dir, result = trained("full")
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == result.best_epoch
    head = torch.load(run_dir / "export" / "head.pt", weights_only=True)
    assert torch.equal(head["weight"], best["trainable"]["head.weight"])
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], best["trainable"]["backbone.blocks.0.attn.qkv.weight"])


def test_run_directory_contents(trained) -> None:
    run_dir, _ = trained("head")
    for name in ("run_config.json", "split.csv", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run_dir / name).is_file(), name
    split = pd.read_csv(run_dir / "split.csv")
    assert split["split"].value_counts().to_dict() == {"train": 12, "val": 4}
    assert len(read_records(run_dir, "epoch")) == 2


def test_existing_run_needs_resume(trained, separable_tiles: Path) -> None:
    run_dir, _ = trained("head")
    with pytest.raises(ConfigError, match="already contains a run"):
        run_finetune(make_config(separable_tiles, run_dir, mode="head", lr=MODE_LR["head"]))


def test_resume_is_bit_identical(separable_tiles: Path, tmp_path: Path) -> None:
    settings = {
        "mode": "last-1", "lr": 1e-3, "epochs": 2, "accumulation_steps": 2, "class_weights": "balanced", "export": False,
    }
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run_finetune(make_config(separable_tiles, straight_dir, **settings))

    first = run_finetune(make_config(separable_tiles, resumed_dir, stop_after_epoch=1, **settings))
    assert not first.finished
    assert first.epoch == 1
    with pytest.raises(ConfigError, match="lr: 0.001 -> 0.002"):
        run_finetune(make_config(separable_tiles, resumed_dir, resume=True, **{**settings, "lr": 2e-3}))
    second = run_finetune(make_config(separable_tiles, resumed_dir, resume=True, **settings))
    assert second.finished
    assert second.epoch == 2

    straight, resumed = load_checkpoint(straight_dir / "last.pt"), load_checkpoint(resumed_dir / "last.pt")
    assert set(straight["trainable"]) == set(resumed["trainable"])
    for key, value in straight["trainable"].items():
        assert torch.equal(value, resumed["trainable"][key]), key
    for param_id, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], resumed["optimizer"]["state"][param_id]["exp_avg_sq"])
    assert straight["scheduler"] == resumed["scheduler"]
    assert read_records(straight_dir, "step") == read_records(resumed_dir, "step")


@pytest.mark.parametrize(("dataset", "num_images"), [("CRC-VAL-HE-7K", 32), ("Kather2016-texture", 24)])
def test_real_tiles_through_cli(labeled_tiles: Path, tmp_path: Path, dataset: str, num_images: int) -> None:
    run_dir, predictions = tmp_path / "run", tmp_path / "predictions.csv"
    common = ["--model", "virchow-test", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--no-progress"]
    status = main(
        [
            "finetune", str(labeled_tiles / dataset), "--out", str(run_dir), "--weights", "random:0", "--mode", "lora",
            "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.34", *common,
        ]
    )
    assert status == 0
    assert (run_dir / "train.log").read_text().count("epoch 1/1") == 1

    status = main(["predict-tiles", str(labeled_tiles / dataset), "--weights", str(run_dir / "export"), "--out", str(predictions), *common])
    assert status == 0
    table = pd.read_csv(predictions)
    probabilities = table.filter(like="prob_")
    assert len(table) == num_images
    assert probabilities.shape[1] == 8
    assert probabilities.sum(axis=1).round(4).eq(1.0).all()
    assert set(table["predicted"]) <= {column.removeprefix("prob_") for column in probabilities.columns}
