"""Level choice, read size and effective pixel size for a 0.5 um/px, 224-pixel target."""

from __future__ import annotations

import json
import logging

import pytest

from virchow.errors import MissingMppError, ResolutionError
from virchow.wsi.readers import TiffReader, open_slide
from virchow.wsi.resolution import plan_resolution

from .fixtures import CMU_SVS, NDPI, TCGA_SVS


def test_cmu_reads_level0_without_resize():
    with open_slide(CMU_SVS) as reader:
        plan = plan_resolution(reader)
    assert plan.level == 0
    assert plan.read_size == 224
    assert plan.scale == 1.0
    assert not plan.needs_resize
    assert plan.effective_mpp == pytest.approx(0.499)
    assert plan.patch_size_level0 == 224.0


def test_ndpi_uses_level1_within_one_percent():
    with open_slide(NDPI) as reader:
        plan = plan_resolution(reader)
    assert plan.level == 1
    assert plan.level_downsample == 2.0
    assert plan.read_size == 245
    assert plan.patch_size_level0 == 490.0
    assert abs(plan.effective_mpp / 0.5 - 1) < 0.01
    assert plan.mpp_error == pytest.approx(plan.effective_mpp / 0.5 - 1)


def test_missing_mpp_names_both_fixes():
    with open_slide(TCGA_SVS) as reader, pytest.raises(MissingMppError) as info:
        plan_resolution(reader)
    message = str(info.value)
    assert "TCGA-CR-7395-01A-01-TS1.svs" in message
    assert "mpp column" in message
    assert "--assume-mpp VALUE" in message
    assert info.value.reason == "no_mpp"


def test_openslide_skips_fractional_downsample_level():
    # Level 1 of this slide has downsample 2.0005; OpenSlide would interpolate reads there.
    with open_slide(TCGA_SVS, mpp=0.25) as reader:
        plan = plan_resolution(reader)
    assert plan.level == 0
    assert plan.read_size == 448
    assert plan.effective_mpp == pytest.approx(0.5)


def test_tifffile_uses_fractional_downsample_level():
    with TiffReader(TCGA_SVS, mpp=0.25) as reader:
        plan = plan_resolution(reader)
    assert plan.level == 1
    assert plan.read_size == 224
    assert plan.patch_size_level0 == pytest.approx(224 * 4443 / 2221 / 2 + 224 * 3567 / 1783 / 2)


def test_too_coarse_slide_raises():
    with open_slide(CMU_SVS, mpp=1.0) as reader, pytest.raises(ResolutionError, match="coarser") as info:
        plan_resolution(reader)
    assert info.value.reason == "insufficient_resolution"


def test_slightly_coarse_slide_is_upsampled(caplog):
    with open_slide(CMU_SVS, mpp=0.52) as reader, caplog.at_level(logging.WARNING):
        plan = plan_resolution(reader)
    assert plan.level == 0
    assert plan.read_size == 215
    assert plan.needs_resize
    assert any("upsampled" in record.message for record in caplog.records)


def test_level_within_tolerance_counts_as_target():
    with open_slide(CMU_SVS, mpp=0.504) as reader:
        plan = plan_resolution(reader)
    assert plan.read_size == 222
    assert plan.effective_mpp == pytest.approx(0.504 * 222 / 224)


def test_mpp_is_not_rounded_to_magnification():
    with open_slide(CMU_SVS, mpp=0.263) as reader:
        plan = plan_resolution(reader)
    assert plan.read_size == 426
    assert plan.effective_mpp == pytest.approx(0.263 * 426 / 224)
    assert abs(plan.mpp_error) < 0.001


def test_other_target_and_tile_size():
    with open_slide(NDPI) as reader:
        plan = plan_resolution(reader, target_mpp=1.0, tile_size=256)
    assert plan.level == 2
    assert plan.read_size == round(256 * 1.0 / (0.2281750559028887 * 4))


def test_plan_serialises_to_json():
    with open_slide(NDPI) as reader:
        plan = plan_resolution(reader)
    restored = json.loads(json.dumps(plan.to_dict()))
    assert restored["level"] == 1
    assert restored["mpp_source"] == "openslide.mpp-x"


@pytest.mark.parametrize(("target", "tile"), [(0.0, 224), (0.5, 0)])
def test_invalid_target_raises(target, tile):
    with open_slide(CMU_SVS) as reader, pytest.raises(ValueError, match="positive"):
        plan_resolution(reader, target_mpp=target, tile_size=tile)
