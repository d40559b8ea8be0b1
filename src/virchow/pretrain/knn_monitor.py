"""k-nearest-neighbour accuracy of the teacher on a labelled tile folder, as a training monitor.

The folder has one sub-folder of tiles per class. Tiles go through the variant's official
transform and the teacher backbone, and the embedding is the class token concatenated with the mean of
the patch tokens, L2-normalised. Each tile is classified by its ``k`` most similar other tiles
(leave-one-out), each vote weighted by exp(similarity / temperature), as in the DINO kNN
evaluation (Wu et al., arXiv:1805.01978).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from virchow.embed.device import autocast
from virchow.errors import ConfigError
from virchow.models import ModelSpec, pool_tokens
from virchow.preprocess import IMAGE_SUFFIXES, OfficialTransform, load_image
from virchow.pretrain.config import KnnConfig, Precision
from virchow.pretrain.meta_arch import backbone_tokens

_logger = logging.getLogger(__name__)


class KnnMonitor:
    """Leave-one-out kNN accuracy of a backbone on a labelled tile folder.

    Args:
        cfg: folder, k, temperature and batch size.
        spec: the backbone variant (preprocessing and prefix tokens).

    Raises:
        ConfigError: the folder has fewer than two classes or fewer than two tiles.
    """

    def __init__(self, cfg: KnnConfig, spec: ModelSpec) -> None:
        root = Path(cfg.tile_dir or "")
        if not root.is_dir():
            raise ConfigError(f"knn.tile_dir {root} is not a folder")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        files: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        if len(set(labels)) < 2 or len(files) < 2:
            raise ConfigError(f"knn.tile_dir {root} needs at least two class sub-folders with tiles")
        transform = OfficialTransform(spec.preprocess)
        self.images = torch.stack([transform(load_image(path)) for path in files])
        self.labels = torch.tensor(labels)
        self.n_classes = len(classes)
        self.cfg = cfg
        self.spec = spec
        _logger.info("kNN monitor: %d tiles in %d classes from %s", len(files), len(classes), root)

    @torch.no_grad()
    def embed(self, backbone: nn.Module, device: torch.device, precision: Precision) -> torch.Tensor:
        """Return (N, 2D) L2-normalised class-plus-mean embeddings of the folder's tiles."""
        was_training = backbone.training
        backbone.eval()
        chunks = []
        for start in range(0, len(self.images), self.cfg.batch_size):
            batch = self.images[start : start + self.cfg.batch_size].to(device)
            with autocast(device, precision):
                tokens = backbone_tokens(backbone, batch)
            chunks.append(pool_tokens(tokens.float(), "cls+mean", self.spec.num_prefix_tokens).cpu())
        backbone.train(was_training)
        return F.normalize(torch.cat(chunks), dim=-1)

    def accuracy(self, features: torch.Tensor) -> float:
        """Return the leave-one-out weighted kNN accuracy of (N, D) normalised features."""
        similarity = features @ features.t()
        similarity.fill_diagonal_(float("-inf"))
        k = min(self.cfg.k, len(features) - 1)
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / self.cfg.temperature).exp()
        votes = torch.zeros(len(features), self.n_classes)
        votes.scatter_add_(1, self.labels[top_index], weights)
        return float((votes.argmax(dim=1) == self.labels).float().mean())

    def evaluate(self, backbone: nn.Module, device: torch.device, precision: Precision) -> float:
        """Embed the folder with ``backbone`` and return the kNN accuracy."""
        return self.accuracy(self.embed(backbone, device, precision))
