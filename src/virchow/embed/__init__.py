"""Embedding: devices and precisions, the batched embedder, and tile-folder jobs."""

from virchow.embed.device import autocast, cpu_supports_bf16, resolve_device, resolve_precision
from virchow.embed.embedder import Embedder, create_embedder

__all__ = ["Embedder", "autocast", "cpu_supports_bf16", "create_embedder", "resolve_device", "resolve_precision"]
