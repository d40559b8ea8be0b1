"""The training stream: images from tile folders or slides, multi-crop views and iBOT masks.

The stream is an endless sequence of samples numbered 0, 1, 2, ... Sample k is a pure function of
(seed, k): its image, crops and masks come from a ``numpy.random.Generator`` seeded with
``[seed, k]``. Iteration i of a run on W ranks with b images per rank consumes samples
``start + i * W * b`` onwards, rank r taking the r-th block of b. Therefore:

* resuming needs only the position in the stream, saved in the checkpoint;
* the result does not depend on the number of DataLoader workers;
* one process with batch W * b gets exactly the samples that W ranks get together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from virchow.errors import ConfigError, ImageDecodeError
from virchow.preprocess import IMAGE_SUFFIXES, load_image
from virchow.pretrain.augment import BlockMaskGenerator, MultiCropAugmentation
from virchow.pretrain.config import PretrainConfig

_logger = logging.getLogger(__name__)

PATCH_SIZE = 14
#: Files tried per sample before an unreadable tile is raised.
MAX_DECODE_ATTEMPTS = 10


class TileFolderSource:
    """Tile images found recursively under folders, visited in a new random order every epoch.

    Args:
        folders: folders searched for images with the suffixes of :data:`virchow.preprocess.IMAGE_SUFFIXES`.
        seed: seed of the per-epoch permutations.
    """

    def __init__(self, folders: list[str], seed: int) -> None:
        files: list[Path] = []
        for folder in map(Path, folders):
            if not folder.is_dir():
                raise ConfigError(f"data.tile_dirs entry {folder} is not a folder")
            files.extend(sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            raise ConfigError(f"no tile images ({', '.join(IMAGE_SUFFIXES)}) found under {folders}")
        self.files = files
        self.seed = seed
        self._permutation: tuple[int, np.ndarray] | None = None
        _logger.info("%d tile images under %d folders", len(files), len(folders))

    def __len__(self) -> int:
        return len(self.files)

    def _file_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.files))
        if self._permutation is None or self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.files))
            self._permutation = (epoch, order)
        return int(self._permutation[1][offset])

    def load(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Return the tile of sample ``index`` as (H, W, 3) uint8 RGB.

        An unreadable file is logged and the next file of the stream is used instead.

        Raises:
            ImageDecodeError: :data:`MAX_DECODE_ATTEMPTS` files in a row failed.
        """
        del rng  # the permutation alone decides the file
        for attempt in range(MAX_DECODE_ATTEMPTS):
            path = self.files[self._file_index(index + attempt)]
            try:
                return np.asarray(load_image(path))
            except ImageDecodeError as exc:
                _logger.warning("sample %d: skipping an unreadable tile image", index)
                _logger.debug("unreadable tile: %s", exc)
        raise ImageDecodeError(f"{MAX_DECODE_ATTEMPTS} tile images in a row could not be decoded, near sample {index}")


@dataclass
class Sample:
    """One image's training inputs.

    Attributes:
        index: position in the stream.
        global_crops: (2, 3, G, G) float32.
        local_crops: (n_local, 3, L, L) float32.
        masks: (2, P) bool iBOT masks of the global crops.
    """

    index: int
    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor


@dataclass
class Batch:
    """A batch in crop-major order: all images' first global crop, then all their second ones.

    Attributes:
        indices: (B,) stream positions.
        global_crops: (2B, 3, G, G).
        local_crops: (n_local * B, 3, L, L), local crop j of every image before crop j + 1.
        masks: (2B, P) bool.
    """

    indices: torch.Tensor
    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """Move the tensors to ``device``."""
        non_blocking = device.type == "cuda"
        return Batch(
            indices=self.indices,
            global_crops=self.global_crops.to(device, non_blocking=non_blocking),
            local_crops=self.local_crops.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Pin the tensors, so that DataLoader(pin_memory=True) can batch them."""
        return Batch(
            indices=self.indices,
            global_crops=self.global_crops.pin_memory(),
            local_crops=self.local_crops.pin_memory(),
            masks=self.masks.pin_memory(),
        )


class PretrainDataset(Dataset):
    """Map a stream position to a :class:`Sample`.

    Args:
        source: object with ``load(index, rng) -> (H, W, 3) uint8``.
        cfg: the run's configuration (crops, masks, seed).
        mean: normalisation mean of the backbone.
        std: normalisation standard deviation of the backbone.
    """

    def __init__(self, source, cfg: PretrainConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.source = source
        self.seed = cfg.train.seed
        self.augment = MultiCropAugmentation(cfg.crops, mean, std)
        grid = cfg.crops.global_size // PATCH_SIZE
        self.masks = BlockMaskGenerator((grid, grid))
        self.mask_ratio = cfg.ibot.mask_ratio
        self.mask_probability = cfg.ibot.mask_probability if cfg.ibot.loss_weight > 0 else 0.0

    def __len__(self) -> int:
        # The stream is endless, so this is only a large number for DataLoader's bookkeeping.
        return 2**62

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, int(index)])
        image = self.source.load(int(index), rng)
        crops = self.augment(image, rng)
        masks = np.stack([self.masks.sample(self.mask_ratio, self.mask_probability, rng) for _ in range(2)])
        return Sample(int(index), crops.global_crops, crops.local_crops, torch.from_numpy(masks))


def collate_samples(samples: list[Sample]) -> Batch:
    """Stack samples into a crop-major :class:`Batch`."""
    n_local = samples[0].local_crops.shape[0]
    global_crops = torch.cat([torch.stack([s.global_crops[i] for s in samples]) for i in range(2)])
    if n_local:
        local_crops = torch.cat([torch.stack([s.local_crops[j] for s in samples]) for j in range(n_local)])
    else:
        local_crops = samples[0].local_crops.new_empty((0, *samples[0].local_crops.shape[1:]))
    masks = torch.cat([torch.stack([s.masks[i] for s in samples]) for i in range(2)])
    return Batch(torch.tensor([s.index for s in samples]), global_crops, local_crops, masks)


class StreamBatchSampler(Sampler[list[int]]):
    """Yield this rank's stream positions, batch after batch, without end.

    Args:
        batch_size: images per rank.
        rank: this process's rank.
        world_size: number of ranks.
        start: stream position of the first sample of the first batch (over all ranks).
    """

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start + self.rank * self.batch_size
        step = self.batch_size * self.world_size
        while True:
            yield list(range(position, position + self.batch_size))
            position += step


def region_size(cfg: PretrainConfig) -> int:
    """Side in pixels of the image each sample's crops are cut from, when the source can choose it."""
    if cfg.data.region_size is not None:
        return cfg.data.region_size
    return cfg.crops.context_size if cfg.crops.mode == "extended_context" else cfg.crops.global_size


def build_source(cfg: PretrainConfig):
    """Create the image source that ``data.source`` names."""
    if cfg.data.source == "tiles":
        return TileFolderSource(cfg.data.tile_dirs, cfg.train.seed)
    from virchow.pretrain.slides import SlideSource

    return SlideSource(cfg.data, region_size(cfg))


def _worker_init(worker_id: int) -> None:
    del worker_id
    torch.set_num_threads(1)


def build_loader(
    dataset: PretrainDataset, cfg: PretrainConfig, *, rank: int, world_size: int, start: int, pin_memory: bool
) -> DataLoader:
    """Return an endless DataLoader of this rank's batches from stream position ``start`` on."""
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=StreamBatchSampler(cfg.train.batch_size_per_rank, rank, world_size, start),
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        # A private generator keeps the loader from drawing worker seeds from the global torch
        # random state, which a resumed run restores and must find untouched.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
