"""Batched tile embedding with a declared precision, device and embedding kind."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from virchow import __version__
from virchow.embed.device import autocast, resolve_device, resolve_precision
from virchow.errors import ConfigError, ImageDecodeError, NonFiniteEmbeddingError
from virchow.models import LoadedModel, embedding_shape, pool_tokens
from virchow.models.pooling import check_kind
from virchow.preprocess import array_to_image, build_transform, tiles_to_tensor

_logger = logging.getLogger(__name__)

CompileMode = Literal["auto", "on", "off"]

# torch.compile with weight freezing under bf16 autocast costs 20-50 s of compilation on a 2-core
# CPU, so "auto" compiles only for jobs of at least this many tiles. NOTE: its gain varies by machine
# and load: about 1.5x in one trial on a 2-core EPYC, 1.04x in the run in docs/benchmarks.md.
COMPILE_MIN_TILES = 1000


class Embedder:
    """Embed images with a loaded Virchow model.

    Args:
        loaded: the model and its provenance, from :func:`virchow.models.load_model`.
        kind: ``cls+mean`` (default, 2 x width), ``cls``, ``mean`` or ``patch_tokens``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast; outputs are always float32.
        batch_size: images per forward pass.
        compile: ``on`` compiles the model with torch.compile, ``off`` never does, ``auto``
            compiles on the CPU under bf16 when :meth:`prepare` announces a large enough job.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        kind: str = "cls+mean",
        device: str | torch.device = "auto",
        precision: str = "auto",
        batch_size: int = 32,
        compile: CompileMode = "auto",
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {compile!r}")
        self.kind = check_kind(kind)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.compile_mode: CompileMode = compile
        self.spec = loaded.spec
        self.provenance = loaded.provenance
        self.model = loaded.model.to(self.device).eval()
        self._forward = self.model
        self._compiled = False
        self._transform = build_transform(self.spec.preprocess)
        if compile == "on":
            self._compile()

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one image's embedding, for example (2560,) for ``cls+mean`` of full Virchow."""
        return embedding_shape(self.kind, self.spec.embed_dim, self.spec.num_patch_tokens)

    @property
    def compiled(self) -> bool:
        return self._compiled

    def prepare(self, num_images: int) -> None:
        """Announce the size of a job so that ``compile="auto"`` can decide whether to compile."""
        if self.compile_mode != "auto" or self._compiled:
            return
        if self.device.type == "cpu" and self.precision == "bf16" and num_images >= COMPILE_MIN_TILES:
            _logger.info("compiling the model for %d tiles (CPU, bf16); this takes about a minute", num_images)
            self._compile()

    def _compile(self) -> None:
        started = time.perf_counter()
        try:
            compiled = torch.compile(self.model, options={"freezing": True}, dynamic=False)
            with torch.inference_mode():
                warmup = torch.zeros(self.batch_size, 3, self.spec.preprocess.input_size, self.spec.preprocess.input_size)
                self._run_model(compiled, warmup.to(self.device))
        except Exception as exc:  # inductor raises many internal types when no compiler is usable
            _logger.warning("torch.compile failed (%s: %s); continuing with the eager model", type(exc).__name__, exc)
            return
        self._forward = compiled
        self._compiled = True
        _logger.info("model compiled in %.1f s", time.perf_counter() - started)

    def _run_model(self, forward: Any, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            tokens = forward(batch)
        return pool_tokens(tokens.float(), self.kind, self.spec.num_prefix_tokens)

    @torch.inference_mode()
    def embed_normalised(self, batch: torch.Tensor) -> torch.Tensor:
        """Embed a normalised (B, 3, H, W) float batch; returns float32 (B, *output_shape) on the CPU.

        Raises:
            NonFiniteEmbeddingError: some outputs contain NaN or Inf; the error lists the positions.
        """
        batch = batch.to(self.device, non_blocking=True)
        count = batch.shape[0]
        outputs = []
        for start in range(0, count, self.batch_size):
            chunk = batch[start : start + self.batch_size]
            real = chunk.shape[0]
            if self._compiled and real < self.batch_size:
                # The compiled graph has a fixed batch size: pad the last chunk instead of recompiling.
                chunk = torch.cat([chunk, chunk.new_zeros((self.batch_size - real, *chunk.shape[1:]))])
            outputs.append(self._run_model(self._forward, chunk)[:real])
        result = torch.cat(outputs).float()
        self._check_finite(result)
        return result.cpu()

    def embed_tiles(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Embed uint8 RGB tiles of the model's input size, (B, H, W, 3) or (B, 3, H, W)."""
        return self.embed_normalised(tiles_to_tensor(tiles, self.spec.preprocess, self.device))

    def embed(self, images: Sequence[Image.Image | np.ndarray | torch.Tensor]) -> np.ndarray:
        """Embed PIL images, arrays or tensors of any size through the official transform.

        Arrays and tensors of shape (H, W, C) are taken as pixel data in any numeric dtype. A float
        tensor of shape (3, H, W) is taken as already normalised.

        Returns:
            float32 array (N, *output_shape).
        """
        tensors = [self._to_input(image, position) for position, image in enumerate(images)]
        if not tensors:
            return np.zeros((0, *self.output_shape), dtype=np.float32)
        return self.embed_normalised(torch.stack(tensors)).numpy()

    def _to_input(self, image: Image.Image | np.ndarray | torch.Tensor, position: int) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self._transform(image)
        if isinstance(image, torch.Tensor):
            if image.is_floating_point() and image.ndim == 3 and image.shape[0] == 3:
                return image
            image = image.cpu().numpy()
        if isinstance(image, np.ndarray):
            return self._transform(array_to_image(image))
        raise ImageDecodeError(f"image {position} has unsupported type {type(image).__name__}: use PIL, numpy or torch")

    def _check_finite(self, result: torch.Tensor) -> None:
        finite = torch.isfinite(result.reshape(result.shape[0], -1)).all(dim=1)
        if bool(finite.all()):
            return
        positions = torch.nonzero(~finite).flatten().tolist()
        raise NonFiniteEmbeddingError(
            f"the model produced NaN or Inf for batch positions {positions} in {self.precision} on {self.device}; "
            "fp16 can overflow on unusual inputs: retry with --precision bf16 or fp32",
            positions,
        )

    def metadata(self) -> dict[str, Any]:
        """Return what produced these embeddings, for HDF5 attributes and reports."""
        return {
            "model": self.spec.name,
            "architecture": self.spec.architecture,
            **self.provenance.to_attrs(),
            "embedding_kind": self.kind,
            "embedding_dim": int(np.prod(self.output_shape)),
            "precision": self.precision,
            "device": str(self.device),
            "compiled": self._compiled,
            "virchow_version": __version__,
            "torch_version": torch.__version__,
        }


def create_embedder(
    model: str = "virchow",
    weights: str | None = None,
    *,
    kind: str = "cls+mean",
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    compile: CompileMode = "auto",
) -> Embedder:
    """Load a model and wrap it in an :class:`Embedder` in one call."""
    from virchow.models import load_model

    resolved_device = resolve_device(device)
    loaded = load_model(model, weights, device=resolved_device)
    return Embedder(
        loaded, kind=kind, device=resolved_device, precision=precision, batch_size=batch_size, compile=compile
    )
