"""Configuration loading, validation, presets and the run record."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from virchow.errors import ConfigError
from virchow.pretrain.config import (
    PRESET_DIR,
    PretrainConfig,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    save_run_info,
)

TILES = ["data.tile_dirs=[tiles]"]


def test_default_yaml_equals_dataclass_defaults():
    from_file = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / "default.yaml"))
    assert from_file == config_to_dict(PretrainConfig())


def test_overrides_change_typed_values():
    cfg = load_config(None, [*TILES, "train.iterations=7", "crops.ect_scale=[0.8,1.2]", "regularizer.kind=kde"])
    assert cfg.train.iterations == 7
    assert cfg.crops.ect_scale == (0.8, 1.2)
    assert cfg.regularizer.kind == "kde"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  iterations: 50\n  seed: 3\ndata:\n  tile_dirs: [a]\n")
    cfg = load_config(path, ["train.iterations=60"])
    assert (cfg.train.iterations, cfg.train.seed, cfg.data.tile_dirs) == (60, 3, ["a"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.iteratons=5", "iteratons"),
        ("regularizer.kind=entropy", "entropy"),
        ("train.iterations=many", "iterations"),
        ("crops.global_size=100", "multiple of the patch size"),
        ("ibot.mask_ratio=[0.6,0.2]", "ibot.mask_ratio"),
        ("teacher.momentum=1.2", "momentum"),
        ("data.mpp_weights=[1,2]", "mpp_weights"),
        ("train.iterations", "section.key=value"),
    ],
)
def test_invalid_settings_raise_config_error(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [*TILES, override])


def test_missing_data_source_is_reported():
    with pytest.raises(ConfigError, match="data.tile_dirs"):
        load_config(None, [])


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="virchow2-continue"):
        load_config("no-such-config.yaml")


@pytest.mark.parametrize("preset", ["virchow2-continue", "virchow-continue", "vit-s14-scratch", "default"])
def test_presets_load_by_name(preset):
    overrides = ["data.slides=[s.svs]", "data.tile_dirs=[t]"]
    cfg = load_config(preset, overrides)
    assert isinstance(cfg, PretrainConfig)


def test_virchow2_preset_switches_on_virchow2_changes():
    cfg = load_config("virchow2-continue", ["data.slides=[s.svs]"])
    assert cfg.regularizer.kind == "kde"
    assert cfg.crops.mode == "extended_context"
    assert cfg.crops.vertical_flip == 0.5
    assert cfg.data.mpp == [0.25, 0.5, 1.0, 2.0]
    assert cfg.model.weights == "official"


def test_dict_round_trip():
    cfg = load_config(None, [*TILES, "train.seed=9"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_run_info_records_config_commit_and_argv(tmp_path):
    cfg = load_config(None, [*TILES, "train.seed=4"])
    save_run_info(cfg, tmp_path, ["virchow", "pretrain", "train.seed=4"])
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    assert saved == config_to_dict(cfg)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["argv"] == ["virchow", "pretrain", "train.seed=4"]
    assert len(info["git_commit"]) == 40 or info["git_commit"] == "unknown"

    save_run_info(cfg, tmp_path, ["again"])
    assert (tmp_path / "config.1.yaml").is_file()


def test_list_presets_names_bundled_files():
    assert {"default", "virchow2-continue", "virchow-continue", "vit-s14-scratch"} <= set(list_presets())


def test_cli_prints_resolved_preset(capsys):
    from virchow.cli.main import main

    assert main(["pretrain", "--config", "virchow2-continue", "data.slides=[s.svs]", "--print-config"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.regularizer.kind == "kde"
    assert printed.data.slides == ["s.svs"]


def test_cli_invalid_override_exits_with_error(caplog):
    from virchow.cli.main import main

    assert main(["pretrain", "data.tile_dirs=[t]", "train.itrations=3"]) == 1
    assert "itrations" in caplog.text


def test_cli_export_needs_out(caplog):
    from virchow.cli.main import main

    assert main(["pretrain", "--export", "last.pt"]) == 1
    assert "--out" in caplog.text
