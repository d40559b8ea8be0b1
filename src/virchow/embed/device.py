"""Device and precision resolution, and the autocast context used for inference."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch

from virchow.errors import DeviceError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

_logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` into an available device.

    ``auto`` picks CUDA, then MPS, then the CPU.

    Raises:
        DeviceError: the device is unknown or not available here.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"invalid device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine: use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} requested but MPS is not available: use --device cpu")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return resolved


def cpu_supports_bf16() -> bool:
    """Return True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    is_supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((is_supported and is_supported()) or (amx and amx()))


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """Resolve ``auto`` and check that the precision works on ``device``.

    ``auto`` is fp16 on CUDA and MPS (the model card recommends fp16 autocast on GPUs), bf16 on
    CPUs with native bf16 instructions, and fp32 otherwise.

    Raises:
        DeviceError: the precision is unknown, or bf16 is requested on a CUDA device without it.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; valid values: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type in ("cuda", "mps"):
            return "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"bf16 is not supported on {device}: use --precision fp16 or fp32")
    return precision  # type: ignore[return-value]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Return the autocast context for ``precision`` on ``device``, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
