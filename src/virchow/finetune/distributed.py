"""Process-group setup for ``torchrun`` and collectives that also work in a single process.

``torchrun --nproc_per_node N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for each process.
When ``WORLD_SIZE`` is above 1, :func:`init_distributed` joins the process group with NCCL on CUDA
or gloo on the CPU. Otherwise the run stays a plain single process. Every helper here checks
``dist.is_initialized()`` first, so training code calls them unconditionally.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from virchow.embed.device import resolve_device
from virchow.errors import ConfigError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job.

    Attributes:
        rank: global rank, 0 in a single process.
        world_size: number of processes.
        local_rank: rank on this machine, which picks the CUDA device.
        device: the device this process trains on.
        owns_group: True when :func:`init_distributed` created the process group, so it must destroy it.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes checkpoints, logs and exports."""
        return self.rank == 0


def init_distributed(device: str) -> DistributedContext:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    Args:
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Under torchrun with CUDA,
            ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: a fixed ``cuda:N`` or ``mps`` was given for a multi-process job.
        DeviceError: the device is not available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=resolve_device(device))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    # NOTE: only the gloo (CPU) path is covered by the tests. The NCCL path below has not been run
    # on GPUs in this project yet.
    if resolved.type == "cuda":
        if device not in ("auto", "cuda"):
            raise ConfigError(
                f"device {device!r} is fixed, but each of the {world_size} processes needs its own GPU: pass --device "
                "cuda (or auto) and each process uses cuda:LOCAL_RANK"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    elif resolved.type != "cpu":
        raise ConfigError(f"multi-process training runs on CUDA or the CPU, not {resolved.type}")

    owns_group = False
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        owns_group = True
    context = DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=resolved, owns_group=owns_group
    )
    _logger.info(
        "process %d of %d on %s (backend %s)", context.rank, context.world_size, context.device, dist.get_backend()
    )
    return context


def shutdown_distributed(context: DistributedContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Return the picklable ``obj`` of every process, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
