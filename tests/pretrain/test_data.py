"""The sample stream: determinism, rank split, tile folders and slides through the wsi layer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.pretrain.conftest import SLIDE, SLIDE_DATA, TILE_DATA, TILES, TINY
from virchow.errors import ConfigError
from virchow.pretrain.config import load_config
from virchow.pretrain.data import (
    PretrainDataset,
    StreamBatchSampler,
    TileFolderSource,
    build_loader,
    build_source,
    collate_samples,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def take(sampler: StreamBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def test_ranks_split_the_combined_batch():
    single = take(StreamBatchSampler(4, rank=0, world_size=1, start=8), 3)
    rank0 = take(StreamBatchSampler(2, rank=0, world_size=2, start=8), 3)
    rank1 = take(StreamBatchSampler(2, rank=1, world_size=2, start=8), 3)
    for combined, first, second in zip(single, rank0, rank1, strict=True):
        assert combined == first + second
    assert single[0] == [8, 9, 10, 11]


def test_tile_folder_visits_every_tile_each_epoch():
    source = TileFolderSource([str(TILES)], seed=0)
    n = len(source)
    first_epoch = {source._file_index(k) for k in range(n)}
    second_epoch = [source._file_index(k) for k in range(n, 2 * n)]
    assert first_epoch == set(range(n))
    assert sorted(second_epoch) == list(range(n))
    assert second_epoch != [source._file_index(k) for k in range(n)]


def test_missing_tile_folder_raises(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        TileFolderSource([str(tmp_path / "missing")], seed=0)
    with pytest.raises(ConfigError, match="no tile images"):
        TileFolderSource([str(tmp_path)], seed=0)


def test_sample_is_pure_function_of_index():
    cfg = load_config(None, [*TINY, *TILE_DATA])
    dataset = PretrainDataset(build_source(cfg), cfg, MEAN, STD)
    again = PretrainDataset(build_source(cfg), cfg, MEAN, STD)
    for index in (0, 5, 77):
        a, b = dataset[index], again[index]
        assert torch.equal(a.global_crops, b.global_crops)
        assert torch.equal(a.local_crops, b.local_crops)
        assert torch.equal(a.masks, b.masks)


def test_loader_same_batches_with_and_without_workers():
    cfg = load_config(None, [*TINY, *TILE_DATA])
    dataset = PretrainDataset(build_source(cfg), cfg, MEAN, STD)
    plain = iter(build_loader(dataset, cfg, rank=0, world_size=1, start=12, pin_memory=False))
    cfg_workers = load_config(None, [*TINY, *TILE_DATA, "data.num_workers=2"])
    workers = iter(build_loader(dataset, cfg_workers, rank=0, world_size=1, start=12, pin_memory=False))
    for _ in range(2):
        a, b = next(plain), next(workers)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.global_crops, b.global_crops)
        assert torch.equal(a.masks, b.masks)


def test_collate_is_crop_major():
    cfg = load_config(None, [*TINY, *TILE_DATA])
    dataset = PretrainDataset(build_source(cfg), cfg, MEAN, STD)
    samples = [dataset[i] for i in range(3)]
    batch = collate_samples(samples)
    assert batch.global_crops.shape == (6, 3, 112, 112)
    assert batch.local_crops.shape == (6, 3, 56, 56)
    assert batch.masks.shape == (6, 64)
    assert torch.equal(batch.global_crops[1], samples[1].global_crops[0])
    assert torch.equal(batch.global_crops[4], samples[1].global_crops[1])
    assert torch.equal(batch.local_crops[5], samples[2].local_crops[1])
    assert torch.equal(batch.masks[3], samples[0].masks[1])


def test_slide_source_reads_tissue_regions():
    cfg = load_config(None, [*TINY, *SLIDE_DATA])
    source = build_source(cfg)
    assert len(source) > 10
    region = source.load(0, np.random.default_rng(0))
    assert region.shape == (224, 224, 3)
    assert region.dtype == np.uint8
    # Regions are chosen on tissue: far from the white background of the slide.
    assert region.mean() < 225


def test_slide_source_mixes_magnifications():
    cfg = load_config(None, [*TINY, *SLIDE_DATA, "data.mpp=[0.5,1.0]", "data.mpp_weights=[1,3]"])
    source = build_source(cfg)
    assert len(source.plans[0]) == 1
    assert len(source.plans[1]) == 1
    assert source.plans[1][0].region_level0 == pytest.approx(2 * source.plans[0][0].region_level0, rel=0.01)
    assert np.allclose(source.mpp_probabilities, [0.25, 0.75])


def test_slide_source_skips_unusable_magnification(caplog):
    # 0.1 um/px is finer than the 0.499 um/px scan and cannot be read without upsampling.
    cfg = load_config(None, [*TINY, *SLIDE_DATA, "data.mpp=[0.1,0.5]"])
    source = build_source(cfg)
    assert np.allclose(source.mpp_probabilities, [0.0, 1.0])
    assert "0.1" in caplog.text


def test_slide_source_without_tissue_raises():
    with pytest.raises(ConfigError, match="tissue_threshold"):
        build_source(load_config(None, [*TINY, *SLIDE_DATA, "data.tissue_threshold=1.0", "data.region_size=2000"]))


def test_slide_list_file(tmp_path):
    listing = tmp_path / "slides.txt"
    listing.write_text(f"# training slides\n{SLIDE}\n")
    cfg = load_config(None, [*TINY, "data.source=slides", f"data.slides=[{listing}]", "data.region_size=224"])
    assert build_source(cfg).paths == [SLIDE]
