"""Config validation, tile sources, validation splits and the global batch sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from virchow.errors import ConfigError, DataError
from virchow.finetune.config import FinetuneConfig, parse_mode
from virchow.finetune.data import GlobalBatchSampler, balanced_class_weights, prepare_split

from .conftest import make_config


def test_parse_mode_accepts_last_n() -> None:
    assert parse_mode("last-4") == ("last-N", 4)
    assert parse_mode("lora") == ("lora", 0)


@pytest.mark.parametrize("mode", ["last-0", "last", "partial", "last-2x"])
def test_parse_mode_rejects_invalid(mode: str) -> None:
    with pytest.raises(ConfigError, match="invalid mode"):
        parse_mode(mode)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embedding", "patch_tokens", "invalid embedding"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("val_fraction", 1.0, "val_fraction"),
        ("layer_decay", 0.0, "layer_decay"),
        ("monitor", "auroc", "invalid monitor"),
        ("color_jitter", "lab", "invalid color_jitter"),
    ],
)
def test_config_rejects_invalid_values(tmp_path: Path, field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, tmp_path / "run", **{field: value})


def test_config_round_trip_and_differences(tmp_path: Path) -> None:
    config = make_config(tmp_path, tmp_path / "run", lr=None, mode="head")
    restored = FinetuneConfig.from_dict(config.to_dict())
    assert restored.resolved_lr == 1e-3
    assert restored.differences(config) == []
    changed = make_config(tmp_path, tmp_path / "run", mode="head", epochs=7, num_workers=3)
    assert changed.differences(config) == ["epochs: 3 -> 7"]


def test_image_folder_split_is_stratified(separable_tiles: Path, tmp_path: Path) -> None:
    split = prepare_split(make_config(separable_tiles, tmp_path, val_fraction=0.25))
    assert split.classes == ["pink", "purple"]
    assert len(split.train) == 12
    assert split.val.class_counts(2).tolist() == [2, 2]
    assert not set(split.train.paths) & set(split.val.paths)


def test_drawn_split_depends_on_seed_only(separable_tiles: Path, tmp_path: Path) -> None:
    first = prepare_split(make_config(separable_tiles, tmp_path, seed=1))
    again = prepare_split(make_config(separable_tiles, tmp_path, seed=1))
    other = prepare_split(make_config(separable_tiles, tmp_path, seed=2))
    assert first.digest() == again.digest()
    assert first.digest() != other.digest()


def _write_csv(separable_tiles: Path, path: Path, *, patients: int = 8) -> pd.DataFrame:
    files = sorted(separable_tiles.rglob("*.png"))
    table = pd.DataFrame(
        {
            "file": [str(f.relative_to(separable_tiles)) for f in files],
            "diagnosis": [f.parent.name for f in files],
            # Two tiles per patient; patients never mix classes.
            "patient": [f"{f.parent.name}-{i % (patients // 2)}" for i, f in enumerate(files)],
        }
    )
    table.to_csv(path, index=False)
    return table


def test_csv_grouped_split_keeps_patients_apart(separable_tiles: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "tiles.csv"
    _write_csv(separable_tiles, csv_path)
    config = make_config(
        csv_path, tmp_path / "run", root=str(separable_tiles), path_col="file", label_col="diagnosis",
        group_col="patient", val_fraction=0.25,
    )
    split = prepare_split(config)
    assert set(split.train.groups) & set(split.val.groups) == set()
    assert split.val.class_counts(2).min() >= 1
    assert "StratifiedGroupKFold" in split.method


def test_csv_split_column(separable_tiles: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "tiles.csv"
    table = _write_csv(separable_tiles, csv_path)
    # Every fourth row validates and the next one is a test row, which training ignores.
    folds = ["train"] * len(table)
    for i in range(0, len(table), 4):
        folds[i] = "val"
        folds[i + 1] = "test"
    table["fold"] = folds
    table.to_csv(csv_path, index=False)
    config = make_config(
        csv_path, tmp_path / "run", root=str(separable_tiles), path_col="file", label_col="diagnosis", split_col="fold"
    )
    split = prepare_split(config)
    assert len(split.val) == 4
    assert len(split.train) == 8
    assert "split column" in split.method


def test_csv_missing_column_is_reported(separable_tiles: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "tiles.csv"
    _write_csv(separable_tiles, csv_path)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['path', 'label'\]"):
        prepare_split(make_config(csv_path, tmp_path / "run"))


def test_csv_missing_image_is_reported(separable_tiles: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "tiles.csv"
    pd.DataFrame({"path": ["nowhere.png", "pink/pink_00.png"], "label": ["a", "b"]}).to_csv(csv_path, index=False)
    with pytest.raises(DataError, match="1 image"):
        prepare_split(make_config(csv_path, tmp_path / "run", root=str(separable_tiles)))


def test_split_too_small_for_classes(separable_tiles: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="both parts need one tile of each"):
        prepare_split(make_config(separable_tiles, tmp_path, val_fraction=0.05))


def test_separate_validation_folder(separable_tiles: Path, tmp_path: Path) -> None:
    split = prepare_split(make_config(separable_tiles, tmp_path, val_data=str(separable_tiles)))
    assert len(split.train) == len(split.val) == 16


def test_missing_data_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found or not usable"):
        prepare_split(make_config(tmp_path / "absent", tmp_path / "run"))


def test_balanced_class_weights_average_to_one() -> None:
    labels = np.array([0, 0, 0, 1])
    weights = balanced_class_weights(labels, 2)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0])
    assert float(weights[labels].mean()) == pytest.approx(1.0)


def _epoch_batches(sampler: GlobalBatchSampler) -> list[list[int]]:
    return [[index for index, _ in batch] for batch in sampler]


def test_sampler_ranks_and_accumulation_cover_the_global_batch() -> None:
    single = _epoch_batches(GlobalBatchSampler(23, 8, 1, rank=0, world_size=1, seed=3))
    ranks = [_epoch_batches(GlobalBatchSampler(23, 8, 2, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 2  # 23 // 8 full batches, the remainder is dropped
    for step, batch in enumerate(single):
        micro = [ranks[r][step * 2 + m] for m in range(2) for r in range(2)]
        assert all(len(part) == 2 for part in micro)
        assert sorted(sum(micro, [])) == sorted(batch)


def test_sampler_reshuffles_each_epoch() -> None:
    sampler = GlobalBatchSampler(16, 4, 1, rank=0, world_size=1, seed=0)
    sampler.set_epoch(1)
    first = _epoch_batches(sampler)
    sampler.set_epoch(2)
    assert _epoch_batches(sampler) != first
    sampler.set_epoch(1)
    assert _epoch_batches(sampler) == first


def test_sampler_rejects_indivisible_batch() -> None:
    with pytest.raises(DataError, match="use a multiple of 4"):
        GlobalBatchSampler(16, 6, 2, rank=0, world_size=2, seed=0)
