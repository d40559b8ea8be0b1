"""The pretraining loop of ``virchow pretrain``: set-up, then one commented phase per step.

Run it in one process, or under ``torchrun`` for DDP or FSDP; every collective is a no-op without a
process group. The run directory receives ``config.yaml`` (the resolved configuration),
``run.json`` (git commit and command line), ``metrics.jsonl``, ``checkpoints/`` and, at the end,
``export/teacher`` in the Hugging Face layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from virchow.embed.device import autocast, resolve_device, resolve_precision
from virchow.errors import ConfigError, VirchowError
from virchow.models import build_model
from virchow.pretrain import sharding
from virchow.pretrain.checkpoint import (
    LAST,
    checkpoint_dir,
    gather_rng_states,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from virchow.pretrain.config import PretrainConfig, config_to_dict, git_commit, log_options, save_run_info
from virchow.pretrain.data import PretrainDataset, build_loader, build_source
from virchow.pretrain.distributed import (
    DistributedContext,
    all_reduce_mean_,
    barrier,
    close_distributed,
    init_distributed,
)
from virchow.pretrain.export import backbone_state_dict, export_backbone
from virchow.pretrain.knn_monitor import KnnMonitor
from virchow.pretrain.meta_arch import SelfDistillation, StepOutput, build_networks, update_teacher
from virchow.pretrain.metrics import MetricsWriter, ProgressLog
from virchow.pretrain.optim import apply_schedules, build_optimizer
from virchow.pretrain.schedules import build_schedules

_logger = logging.getLogger(__name__)


class TrainingDivergedError(VirchowError, FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        output_dir: the run directory.
        iterations: iterations completed when this call returned (including those before a resume).
        start_iteration: iteration this call started from (0 unless it resumed).
        export_dir: folder of the exported teacher, or None if none was written.
        final_metrics: the last metrics record written.
    """

    output_dir: Path
    iterations: int
    start_iteration: int
    export_dir: Path | None
    final_metrics: dict


def _training_device(cfg: PretrainConfig) -> torch.device:
    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and device.index is None:
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _grad_scaler(student: nn.Module, device: torch.device, enabled: bool):
    if sharding.is_fsdp(student):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def _eval_backbone(teacher: nn.Module, cfg: PretrainConfig, ctx: DistributedContext) -> nn.Module | None:
    """Return the teacher backbone to evaluate on rank 0 (a full copy under FSDP); None on other ranks."""
    if not sharding.is_fsdp(teacher):
        return sharding.unwrap(teacher).backbone if ctx.is_main else None
    state = sharding.full_state_dict(teacher)  # collective; only rank 0 receives the tensors
    if not ctx.is_main:
        return None
    from virchow.models import get_model_spec

    backbone = build_model(get_model_spec(cfg.model.name), device="meta")
    backbone.load_state_dict(backbone_state_dict(state), strict=True, assign=True)
    return backbone


def train(cfg: PretrainConfig, argv: Sequence[str] | None = None) -> TrainResult:
    """Pretrain the configured backbone with the DINOv2 objective and export the teacher.

    Args:
        cfg: the validated configuration (see :func:`virchow.pretrain.config.load_config`).
        argv: the command line recorded in ``run.json``; ``sys.argv`` when None.

    Raises:
        TrainingDivergedError: the loss became NaN or infinite.
        ConfigError, WeightsError, SlideError: invalid settings, weights or data.
    """
    # process group, device and run directory
    device = _training_device(cfg)
    ctx = init_distributed(device.type)
    try:
        return _train(cfg, argv, device, ctx)
    finally:
        close_distributed()


def _check_regularizer_batch(cfg: PretrainConfig, world_size: int) -> None:
    # The regulariser compares the class tokens of one global crop across images.
    if cfg.regularizer.kind == "none" or cfg.regularizer.weight == 0:
        return
    images = cfg.train.batch_size_per_rank * (world_size if cfg.regularizer.scope == "global" else 1)
    if images < 2:
        raise ConfigError(
            f"regularizer.kind={cfg.regularizer.kind} compares images, but it sees {images} image per step: raise "
            "train.batch_size_per_rank to 2 or more, use regularizer.scope=global under torchrun, or set "
            "regularizer.kind=none"
        )


def _train(cfg: PretrainConfig, argv: Sequence[str] | None, device: torch.device, ctx: DistributedContext) -> TrainResult:
    precision = resolve_precision(cfg.train.precision, device)
    output_dir = Path(cfg.train.output_dir)
    global_batch = cfg.train.batch_size_per_rank * ctx.world_size
    _check_regularizer_batch(cfg, ctx.world_size)
    if ctx.is_main:
        save_run_info(cfg, output_dir, argv)
        log_options(cfg)
    commit = git_commit()

    # networks, identical on every rank because the seed is
    torch.manual_seed(cfg.train.seed)
    student, teacher, spec = build_networks(cfg)
    objective = SelfDistillation(cfg, cfg.crops.n_local)
    depth = len(student.backbone.blocks)

    # resume
    last = checkpoint_dir(output_dir) / LAST
    checkpoint = load_checkpoint(last) if cfg.train.resume and last.is_file() else None
    start_iteration, stream_start = 0, 0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        teacher.load_state_dict(checkpoint["teacher"])
        objective.load_state_dict(checkpoint["objective"])
        start_iteration, stream_start = int(checkpoint["iteration"]), int(checkpoint["samples_seen"])
        _logger.info("resuming %s at iteration %d (stream position %d)", output_dir, start_iteration, stream_start)

    # placement, sharding, optimiser and gradient scaler
    student.to(device)
    teacher.to(device)
    objective.to(device)
    student_model, teacher_model = sharding.wrap_networks(student, teacher, cfg.train.sharding, device)
    optimizer = build_optimizer(student_model.named_parameters(), cfg, depth)
    scaler = _grad_scaler(student_model, device, enabled=precision == "fp16")
    schedules = build_schedules(cfg, global_batch)
    torch.manual_seed(cfg.train.seed + 1 + ctx.rank)  # drop path differs per rank, like the data
    if checkpoint is not None:
        sharding.load_optimizer_state_dict(student_model, optimizer, checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint, ctx, device)
        del checkpoint

    # data
    dataset = PretrainDataset(build_source(cfg), cfg, spec.preprocess.mean, spec.preprocess.std)
    loader = build_loader(
        dataset, cfg, rank=ctx.rank, world_size=ctx.world_size, start=stream_start, pin_memory=device.type == "cuda"
    )
    batches = iter(loader)

    # monitors
    knn = KnnMonitor(cfg.knn, spec) if cfg.knn.tile_dir and ctx.is_main else None
    writer = MetricsWriter(output_dir / "metrics.jsonl") if ctx.is_main else None
    if writer is not None:
        writer.discard_after(start_iteration)
    progress = ProgressLog(writer, cfg.train.iterations, global_batch, device)
    last_record: dict = {}
    export_dir: Path | None = None

    end = cfg.train.iterations
    if cfg.train.stop_after:
        end = min(end, start_iteration + cfg.train.stop_after)
    for iteration in range(start_iteration, end):
        done = iteration + 1
        is_last = done == cfg.train.iterations
        stops_here = done == end
        batch = next(batches).to(device)

        # schedules
        lr, weight_decay = apply_schedules(optimizer, schedules, iteration)
        momentum = schedules.momentum(iteration)
        teacher_temp = schedules.teacher_temp(iteration)

        # losses
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            step = objective(
                student_model, teacher_model, batch.global_crops, batch.local_crops, batch.masks, teacher_temp
            )

        # backward, gradient clipping and optimiser step
        scaler.scale(step.loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = sharding.clip_gradients(student_model, cfg.optim.clip_grad)
        scaler.step(optimizer)
        scaler.update()

        # teacher EMA
        update_teacher(sharding.unwrap(student_model), teacher_model, momentum)

        # metrics, averaged over ranks; a non-finite loss stops every rank at the same iteration
        values = _reduce_step(step, grad_norm)
        if not math.isfinite(values["loss"]):
            parts = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
            raise TrainingDivergedError(
                f"the loss is not finite at iteration {done} ({parts}): lower optim.lr, raise "
                "optim.warmup_iterations, or use train.precision=bf16 instead of fp16"
            )
        progress.add(values)
        if done % cfg.train.log_every == 0 or is_last:
            schedule_values = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "teacher_temp": teacher_temp}
            last_record = progress.write(done, {**schedule_values, "masked_patches": step.n_masked})

        # kNN monitor
        if cfg.knn.tile_dir and (done % cfg.knn.every == 0 or is_last):
            backbone = _eval_backbone(teacher_model, cfg, ctx)
            if knn is not None and backbone is not None:
                accuracy = knn.evaluate(backbone.to(device), device, precision)
                record = {"iteration": done, "knn_accuracy": accuracy}
                last_record = {**last_record, **record}
                assert writer is not None
                writer.write(record)
                _logger.info("iteration %d: teacher kNN accuracy %.3f", done, accuracy)
            barrier()

        # checkpoint
        if done % cfg.train.checkpoint_every == 0 or stops_here:
            _save(cfg, ctx, device, student_model, teacher_model, objective, optimizer, scaler,
                  iteration=done, samples_seen=stream_start + (done - start_iteration) * global_batch, commit=commit)

        # export of the teacher backbone
        if is_last or (cfg.train.export_every and done % cfg.train.export_every == 0):
            export_dir = _export(cfg, ctx, teacher_model, output_dir, iteration=done, commit=commit, final=is_last)

    if end < cfg.train.iterations:
        _logger.info("stopping after iteration %d of %d (train.stop_after); rerun to continue", end, cfg.train.iterations)
    return TrainResult(
        output_dir=output_dir,
        iterations=end,
        start_iteration=start_iteration,
        export_dir=export_dir if export_dir is not None else _existing_export(output_dir),
        final_metrics=last_record,
    )


def _reduce_step(step: StepOutput, grad_norm: torch.Tensor) -> dict[str, float]:
    """Average the losses and monitors of one step over ranks (one all-reduce)."""
    names = ["loss", *step.parts, "teacher_cls_std", "teacher_entropy", "grad_norm"]
    tensors = [step.loss, *step.parts.values(), step.teacher_cls_std, step.teacher_entropy, grad_norm]
    stacked = torch.stack([t.detach().float().to(step.loss.device) for t in tensors])
    return dict(zip(names, all_reduce_mean_(stacked).tolist(), strict=True))


def _existing_export(output_dir: Path) -> Path | None:
    # A run resumed after its last iteration trains nothing and returns the export it already wrote.
    directory = output_dir / "export" / "teacher"
    return directory if (directory / "config.json").is_file() else None


def _save(
    cfg: PretrainConfig,
    ctx: DistributedContext,
    device: torch.device,
    student: nn.Module,
    teacher: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    *,
    iteration: int,
    samples_seen: int,
    commit: str,
) -> None:
    # Every rank takes part in the gathers; only rank 0 writes.
    student_state = sharding.full_state_dict(student)
    teacher_state = sharding.full_state_dict(teacher)
    optimizer_state = sharding.optimizer_state_dict(student, optimizer)
    rng = gather_rng_states(device)
    if ctx.is_main:
        state = {
            "iteration": iteration,
            "samples_seen": samples_seen,
            "world_size": ctx.world_size,
            "student": student_state,
            "teacher": teacher_state,
            "objective": {k: v.cpu() for k, v in objective.state_dict().items()},
            "optimizer": optimizer_state,
            "scaler": scaler.state_dict(),
            "rng": rng,
            "config": config_to_dict(cfg),
            "git_commit": commit,
        }
        save_checkpoint(state, cfg.train.output_dir, iteration=iteration, keep=cfg.train.keep_checkpoints)
    barrier()


def _export(
    cfg: PretrainConfig, ctx: DistributedContext, teacher: nn.Module, output_dir: Path, *, iteration: int, commit: str, final: bool
) -> Path:
    state = sharding.full_state_dict(teacher)
    name = "teacher" if final else f"teacher_iter_{iteration:07d}"
    directory = output_dir / "export" / name
    if ctx.is_main:
        provenance = {
            "pretrain_network": "teacher",
            "pretrain_iteration": iteration,
            "pretrain_git_commit": commit,
            "pretrain_init_weights": cfg.model.weights,
        }
        export_backbone(state, cfg.model.name, directory, provenance=provenance)
    barrier()
    return directory
