"""Shared fixtures: paths of the bundled sample data and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    return DATA / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def labeled_tiles() -> Path:
    return DATA / "tiles" / "labeled"
