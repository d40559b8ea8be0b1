"""Wrapping the student and the teacher for DDP or FSDP, and reading full state dicts back.

With DDP the student is replicated and its gradients are averaged. The teacher stays a plain
module because it only receives EMA updates, which are identical on every rank. With FSDP both
are sharded the same way (one unit per transformer block, ``use_orig_params=True``), so the EMA
pairs the teacher's and the student's local shards one to one. In a single process nothing is
wrapped.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from virchow.errors import ConfigError

Sharding = Literal["ddp", "fsdp"]


def _block_class(network: nn.Module) -> type[nn.Module]:
    return type(network.backbone.blocks[0])  # type: ignore[index,union-attr]


def wrap_networks(
    student: nn.Module, teacher: nn.Module, sharding: Sharding, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """Return the (student, teacher) modules to call in the training step.

    The modules must already be on ``device``. Without a process group they are returned as they are.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return student, teacher
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=device_ids, broadcast_buffers=False), teacher

    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({_block_class(student)})
    options = dict(
        auto_wrap_policy=policy,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        device_id=device,
        # Every rank builds the same weights from the same seed; the broadcast is a safety net that
        # FSDP supports only for CUDA modules.
        sync_module_states=device.type == "cuda",
    )
    return FullyShardedDataParallel(student, **options), FullyShardedDataParallel(teacher, **options)


def is_fsdp(module: nn.Module) -> bool:
    """True when ``module`` is wrapped by FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def unwrap(module: nn.Module) -> nn.Module:
    """Return the module inside a DDP wrapper; FSDP modules and plain modules are returned as they are."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def clip_gradients(student: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of the student to ``max_norm`` (0 only measures it); return the norm before."""
    limit = max_norm if max_norm > 0 else float("inf")
    if is_fsdp(student):
        return student.clip_grad_norm_(limit)  # type: ignore[operator]
    return torch.nn.utils.clip_grad_norm_(unwrap(student).parameters(), limit)


@contextlib.contextmanager
def full_state_dict_context(module: nn.Module, *, rank0_only: bool):
    """Make ``state_dict()`` of an FSDP module return full, unsharded tensors."""
    if not is_fsdp(module):
        yield
        return
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

    with FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=rank0_only)
    ):
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Return the unsharded state dict on the CPU; under FSDP every rank must call it and only rank 0 gets it."""
    with full_state_dict_context(module, rank0_only=True):
        state = unwrap(module).state_dict()
    return {key: value.detach().cpu() for key, value in state.items()}


def optimizer_state_dict(student: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Return the optimiser state to checkpoint (every rank must call it).

    Under FSDP each rank's own shard of the state is gathered to rank 0 as it is, keyed by rank,
    and other ranks get an empty dict. FSDP's consolidated ``optim_state_dict`` is not used because
    with ``use_orig_params=True`` it returned ``exp_avg`` equal to ``exp_avg_sq`` (torch 2.14,
    gloo), which made resumed runs diverge.
    """
    if not is_fsdp(student):
        return optimizer.state_dict()
    shards: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(optimizer.state_dict(), shards, dst=0)
    return {"fsdp_rank_shards": shards} if shards is not None else {}


def load_optimizer_state_dict(student: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimiser state saved by :func:`optimizer_state_dict`.

    Raises:
        ConfigError: an FSDP state was written by a different number of ranks (each rank saved its
            own shard, so the layout must match), or the state does not fit the sharding mode.
    """
    if not is_fsdp(student):
        if "fsdp_rank_shards" in state:
            raise ConfigError("the checkpoint's optimiser state was written with train.sharding=fsdp: resume with fsdp")
        optimizer.load_state_dict(state)
        return
    shards = state.get("fsdp_rank_shards")
    if shards is None:
        raise ConfigError("the checkpoint's optimiser state was not written with train.sharding=fsdp: resume with ddp")
    if len(shards) != dist.get_world_size():
        raise ConfigError(
            f"the checkpoint's FSDP optimiser state has {len(shards)} rank shards but this run has "
            f"{dist.get_world_size()} ranks: resume with torchrun --nproc_per_node {len(shards)} (per machine)"
        )
    optimizer.load_state_dict(shards[dist.get_rank()])
