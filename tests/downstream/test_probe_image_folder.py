"""Probe on real labelled tiles (ImageFolder), embedded on the fly by the small test model."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.downstream.helpers import run_command
from virchow.cli import probe as probe_command
from virchow.downstream.image_folder import cache_key, folder_fingerprint, list_image_folder
from virchow.errors import DataError

CRC_TILES = "CRC-VAL-HE-7K"


@pytest.fixture
def crc_folder(labeled_tiles, tmp_path):
    """A copy of the 8 x 4 CRC-VAL-HE-7K tiles, so modification times belong to this test."""
    folder = tmp_path / CRC_TILES
    shutil.copytree(labeled_tiles / CRC_TILES, folder)
    return folder


def _argv(folder, cache, out):
    return [
        "--image-folder",
        str(folder),
        "--model",
        "virchow-test",
        "--weights",
        "random:0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--num-workers",
        "0",
        "--batch-size",
        "16",
        "--folds",
        "2",
        "--k",
        "3",
        "--bootstrap",
        "50",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
    ]


def test_image_folder_probe_reuses_cache(crc_folder, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        assert run_command(probe_command, _argv(crc_folder, cache, tmp_path / "first")) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    assert first["source"]["cache_reused"] is False
    assert "reusing cached embeddings" not in caplog.text
    assert first["n_samples"] == 32
    assert first["classes"] == ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert first["source"]["attributes"]["model"] == "virchow-test"
    assert len(list(cache.glob("*.h5"))) == 1

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_command(probe_command, _argv(crc_folder, cache, tmp_path / "second")) == 0
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert second["source"]["cache_reused"] is True
    assert "reusing cached embeddings" in caplog.text
    assert second["methods"]["linear"]["pooled"] == first["methods"]["linear"]["pooled"]
    assert (tmp_path / "second" / "report.md").is_file()


def test_cache_key_follows_folder_and_settings(crc_folder):
    metadata = {
        "model": "virchow-test",
        "weights_source": "random:0",
        "embedding_kind": "cls+mean",
        "precision": "fp32",
        "device": "cpu",
    }
    entries = list_image_folder(crc_folder)
    key = cache_key(folder_fingerprint(crc_folder, entries), metadata)

    assert cache_key(folder_fingerprint(crc_folder, entries), {**metadata, "device": "cuda:0"}) == key
    assert cache_key(folder_fingerprint(crc_folder, entries), {**metadata, "precision": "bf16"}) != key
    assert cache_key(folder_fingerprint(crc_folder, entries), {**metadata, "weights_source": "random:1"}) != key

    shutil.copy(next((crc_folder / "TUM").glob("*.png")), crc_folder / "TUM" / "copy.png")
    changed = list_image_folder(crc_folder)
    assert len(changed) == 33
    assert cache_key(folder_fingerprint(crc_folder, changed), metadata) != key


def test_folder_needs_two_classes(tmp_path, crc_folder):
    single = tmp_path / "single"
    shutil.copytree(crc_folder / "TUM", single / "TUM")
    with pytest.raises(DataError, match="at least two class subfolders"):
        list_image_folder(single)
