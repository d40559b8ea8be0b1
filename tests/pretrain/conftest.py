"""Shared settings of the pretraining tests: the tiny test variant with small crops and heads on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent.parent / "data"
SLIDE = DATA / "wsi" / "CMU-1-Small-Region.svs"
TILES = DATA / "tiles" / "labeled" / "CRC-VAL-HE-7K"

# Small heads and crops keep one iteration of the 2-block, width-160 test variant at about 0.1 to
# 0.3 s on 2 CPU cores. Global crops of 112 px (8 x 8 patches) still exercise masking and the
# position-embedding interpolation, and local crops of 56 px a second resolution.
TINY = [
    "model.name=virchow-test",
    "model.drop_path_rate=0.0",
    "dino.head.n_prototypes=256",
    "dino.head.hidden_dim=256",
    "dino.head.bottleneck_dim=64",
    "ibot.head.n_prototypes=256",
    "ibot.head.hidden_dim=256",
    "ibot.head.bottleneck_dim=64",
    "crops.n_local=2",
    "crops.global_size=112",
    "crops.local_size=56",
    "train.device=cpu",
    "train.precision=fp32",
    "train.batch_size_per_rank=4",
    "train.log_every=1",
    "data.num_workers=0",
    "optim.lr=1e-3",
    "optim.lr_scaling=none",
    "optim.warmup_iterations=5",
    "optim.freeze_last_layer_iterations=0",
    "teacher.temp_warmup_iterations=5",
]

TILE_DATA = ["data.source=tiles", f"data.tile_dirs=[{TILES}]"]
SLIDE_DATA = ["data.source=slides", f"data.slides=[{SLIDE}]", "data.region_size=224"]


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a loaded 2-core machine this is faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
