"""The command line: help on every command, embed-tiles on real tiles, info."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from virchow.cli.main import COMMANDS, build_parser, main


def test_every_command_is_available():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert set(subparsers.choices) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: virchow" in capsys.readouterr().out


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    assert "bf16" in out


def test_embed_tiles_real_tiles_and_a_corrupt_file(tmp_path, labeled_tiles, caplog):
    tiles = tmp_path / "tiles"
    shutil.copytree(labeled_tiles, tiles)
    (tiles / "CRC-VAL-HE-7K" / "TUM" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    out = tmp_path / "features.h5"

    status = main(["embed-tiles", str(tiles), "--out", str(out), "--model", "virchow-test", "--weights", "random:0",
                   "--precision", "fp32", "--no-progress", "--workers", "0"])

    assert status == 1
    assert "corrupt.png" in caplog.text
    with h5py.File(out) as handle:
        paths = [p.decode() for p in handle["paths"][:]]
        assert handle["features"].shape == (8 * 4 + 8 * 3, 320)
        assert handle["features"].dtype == np.float32
        assert np.isfinite(handle["features"][:]).all()
        assert "CRC-VAL-HE-7K/ADI/ADI-TCGA-EENSRDNW.png" in paths
        assert [p.decode() for p in handle["failed_paths"][:]] == ["CRC-VAL-HE-7K/TUM/corrupt.png"]
        assert handle.attrs["model"] == "virchow-test"
        assert handle.attrs["weights_random"]
        assert handle.attrs["embedding_kind"] == "cls+mean"
        assert handle.attrs["precision"] == "fp32"
        assert handle.attrs["virchow_version"]


def test_embed_tiles_all_good_exits_zero(tmp_path, labeled_tiles):
    out = tmp_path / "kather.h5"
    status = main(["embed-tiles", str(labeled_tiles / "Kather2016-texture"), "--out", str(out), "--model",
                   "virchow2-test", "--weights", "random:1", "--embedding", "cls", "--no-progress"])
    assert status == 0
    with h5py.File(out) as handle:
        assert handle["features"].shape == (24, 160)
        assert handle.attrs["embedding_kind"] == "cls"
    assert not list(tmp_path.glob(".*.tmp"))


def test_embed_tiles_missing_weights_fails(tmp_path, labeled_tiles, caplog):
    status = main(["embed-tiles", str(labeled_tiles), "--out", str(tmp_path / "x.h5"), "--model", "virchow-test",
                   "--weights", str(tmp_path / "missing.safetensors")])
    assert status == 1
    assert "not found" in caplog.text
    assert not (tmp_path / "x.h5").exists()
