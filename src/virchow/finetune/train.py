"""The fine-tuning loop: AdamW with warm-up and cosine decay, mixed precision, accumulation,
early stopping, checkpoints that resume bit for bit, and DistributedDataParallel under torchrun.

The run directory contains ``run_config.json`` (resolved config, git revision, versions, data split
summary), ``split.csv`` (every tile with its split), ``metrics.jsonl`` (one record per optimiser
step and per epoch), ``last.pt`` (checkpoint after every epoch), ``best.pt`` (trainable weights of
the best validation epoch) and ``export/`` (see :mod:`virchow.finetune.export`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from virchow import __version__
from virchow.embed.device import autocast, resolve_precision
from virchow.errors import ConfigError, VirchowError
from virchow.finetune.augment import TileAugment
from virchow.finetune.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    seed_worker,
)
from virchow.finetune.config import FinetuneConfig
from virchow.finetune.data import GlobalBatchSampler, TileDataset, balanced_class_weights, prepare_split
from virchow.finetune.distributed import (
    DistributedContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from virchow.finetune.export import export_classifier
from virchow.finetune.metrics import classification_metrics, is_improvement
from virchow.finetune.modes import TileClassifier, apply_mode, load_trainable_state_dict, trainable_state_dict
from virchow.finetune.records import RunRecords
from virchow.finetune.schedule import build_optimizer, build_scheduler
from virchow.models import load_model
from virchow.models.registry import PreprocessConfig

_logger = logging.getLogger(__name__)


class TrainingDivergedError(VirchowError, FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class FinetuneResult:
    """Outcome of :func:`run_finetune`.

    Attributes:
        out_dir: the run directory.
        epoch: last completed epoch.
        finished: False when ``stop_after_epoch`` ended the run before its last epoch.
        stopped_early: True when early stopping ended the run.
        best_epoch: epoch with the best validation metric, or None without validation.
        best_metric: that metric's value.
        history: one record per completed epoch (the ``epoch`` records of ``metrics.jsonl``).
        export_dir: where the model was exported, or None.
    """

    out_dir: Path
    epoch: int
    finished: bool
    stopped_early: bool
    best_epoch: int | None
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    export_dir: Path | None = None


@dataclass
class _Progress:
    epoch: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a Virchow backbone and linear head on labelled tiles as ``config`` describes.

    Under ``torchrun`` every process runs this function with the same config. Rank 0 writes the
    run directory, and the others only train.

    Raises:
        ConfigError: invalid settings, an existing run without ``resume``, or a checkpoint that
            does not match the config.
        DataError: the tiles or the split are unusable.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    context = init_distributed(config.device)
    try:
        return _Trainer(config, context).run()
    finally:
        shutdown_distributed(context)


class _Trainer:
    def __init__(self, config: FinetuneConfig, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.device = context.device
        self.precision = resolve_precision(config.precision, self.device)
        self.out_dir = config.out_path
        self.records = RunRecords(self.out_dir, enabled=context.is_main)

    # -- setup ---------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        config, context = self.config, self.context

        # run directory, seeds and data
        last_path = self.out_dir / "last.pt"
        if config.resume and not last_path.is_file():
            raise ConfigError(f"cannot resume: {last_path} not found")
        if not config.resume and last_path.exists():
            raise ConfigError(f"{self.out_dir} already contains a run: pass --resume to continue it, or choose another --out")
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.split = prepare_split(config)

        # model, data loaders, optimiser, schedule and gradient scaler
        preprocess = self._build_model(len(self.split.classes))
        self._build_loaders(preprocess)
        self.optimizer, self.trainable = build_optimizer(self.classifier, config)
        steps_per_epoch = self.sampler.steps_per_epoch
        self.scheduler, warmup_steps, total_steps = build_scheduler(self.optimizer, config, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._log_options(steps_per_epoch, total_steps, warmup_steps)

        # fresh start or resume
        if config.resume:
            progress = self._resume(last_path)
        else:
            progress = _Progress()
            self.records.truncate_after(0)
            self.records.write_run(
                config, self.split, self.base_weights, precision=self.precision, world_size=context.world_size,
                steps_per_epoch=steps_per_epoch,
            )
        barrier()
        return self._loop(progress)

    def _build_model(self, num_classes: int) -> PreprocessConfig:
        """Load the backbone, add the head, apply the mode and wrap in DDP, and return the preprocessing."""
        config = self.config
        loaded = load_model(config.model, config.weights, device="cpu")
        self.base_weights = loaded.provenance
        # The head (and LoRA) initialisation draws from the global generator, seeded for every rank alike.
        torch.manual_seed(config.seed)
        classifier = TileClassifier(loaded.model, loaded.spec, config.embedding, num_classes)
        apply_mode(classifier, config)
        if config.grad_checkpointing:
            if config.mode_kind == "head":
                _logger.warning("gradient checkpointing has no effect in head mode, where the backbone has no gradients")
            classifier.backbone.set_grad_checkpointing(True)
        classifier.to(self.device)
        self.classifier = classifier
        self.model: torch.nn.Module = classifier
        if self.context.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(classifier, device_ids=device_ids)
        return loaded.spec.preprocess

    def _build_loaders(self, preprocess: PreprocessConfig) -> None:
        config, split = self.config, self.split
        self.sampler = GlobalBatchSampler(
            len(split.train), config.batch_size, config.accumulation_steps, self.context.rank, self.context.world_size,
            config.seed,
        )
        augment = None
        if config.augment:
            augment = TileAugment(
                color_jitter=config.color_jitter, color_strength=config.color_strength, blur_prob=config.blur_prob
            )
        self.loader_generator = torch.Generator()
        self.train_loader = DataLoader(
            TileDataset(split.train, preprocess, augment, config.seed),
            batch_sampler=self.sampler,
            num_workers=config.num_workers,
            worker_init_fn=seed_worker,
            generator=self.loader_generator,
            pin_memory=self.device.type == "cuda",
        )
        self.val_dataset = TileDataset(split.val, preprocess) if len(split.val) else None
        self.class_weights = None
        if config.class_weights == "balanced":
            self.class_weights = balanced_class_weights(split.train.labels, len(split.classes)).to(self.device)
            _logger.info("class weights: %s", dict(zip(split.classes, self.class_weights.tolist(), strict=True)))

    def _log_options(self, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> None:
        if not self.context.is_main:
            return
        for key, value in self.config.to_dict().items():
            _logger.info("option %s = %r", key, value)
        _logger.info(
            "precision %s on %s, %d process(es), micro-batch %d per process, %d optimiser steps per epoch, "
            "%d in all, %d warm-up",
            self.precision, self.device, self.context.world_size, self.sampler.micro_batch_size, steps_per_epoch,
            total_steps, warmup_steps,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def _resume(self, path: Path) -> _Progress:
        payload = load_checkpoint(path)
        saved = FinetuneConfig.from_dict(payload["config"])
        differences = self.config.differences(saved)
        if differences:
            raise ConfigError(
                f"cannot resume {path}: these settings differ from the interrupted run: {'; '.join(differences)}. "
                "Resume with the original settings or start a new run in another directory."
            )
        if payload["data_digest"] != self.split.digest():
            raise ConfigError(
                f"cannot resume {path}: the training or validation tiles differ from the interrupted run "
                "(files added, removed or relabelled)"
            )
        if payload["base_weights"] != self.base_weights.to_attrs():
            raise ConfigError(
                f"cannot resume {path}: the base weights differ from the interrupted run "
                f"({payload['base_weights']['weights_source']} before, {self.base_weights.source} now)"
            )
        if payload["device_type"] != self.device.type:
            _logger.warning(
                "resuming a %s run on %s: results will differ slightly from an uninterrupted run",
                payload["device_type"], self.device.type,
            )

        load_trainable_state_dict(self.classifier, payload["trainable"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        restore_rng_state(payload["rng"])
        progress = _Progress(
            epoch=payload["epoch"],
            best_metric=payload["best_metric"],
            best_epoch=payload["best_epoch"],
            epochs_without_improvement=payload["epochs_without_improvement"],
            stopped_early=payload["stopped_early"],
            history=list(payload["history"]),
        )
        self.records.truncate_after(progress.epoch)
        _logger.info("resumed from %s after epoch %d", path, progress.epoch)
        return progress

    def _save(self, progress: _Progress, *, improved: bool) -> None:
        if not self.context.is_main:
            return
        trainable = trainable_state_dict(self.classifier)
        payload = {
            "config": self.config.to_dict(),
            "epoch": progress.epoch,
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "best_metric": progress.best_metric,
            "best_epoch": progress.best_epoch,
            "epochs_without_improvement": progress.epochs_without_improvement,
            "stopped_early": progress.stopped_early,
            "history": progress.history,
            "metrics": progress.history[-1] if progress.history else {},
            "classes": self.split.classes,
            "data_digest": self.split.digest(),
            "base_weights": self.base_weights.to_attrs(),
            "device_type": self.device.type,
        }
        save_checkpoint(payload, self.out_dir / "last.pt")
        if improved:
            best = {"config": payload["config"], "epoch": progress.epoch, "trainable": trainable, "metrics": payload["metrics"]}
            save_checkpoint(best, self.out_dir / "best.pt")

    # -- training ------------------------------------------------------------------------------

    def _loop(self, progress: _Progress) -> FinetuneResult:
        config = self.config
        finished = True
        if progress.stopped_early:
            _logger.info("the interrupted run had already stopped early at epoch %d", progress.epoch)

        for epoch in range(progress.epoch + 1, config.epochs + 1):
            if progress.stopped_early:
                break
            started = time.perf_counter()
            train_loss, last_lr = self._train_epoch(epoch)
            val_metrics = self._evaluate() if self.val_dataset is not None else {}

            # early stopping bookkeeping
            improved = False
            if val_metrics:
                improved = is_improvement(val_metrics[config.monitor], progress.best_metric, config.monitor)
                if improved:
                    progress.best_metric, progress.best_epoch = val_metrics[config.monitor], epoch
                    progress.epochs_without_improvement = 0
                else:
                    progress.epochs_without_improvement += 1
                if config.patience and progress.epochs_without_improvement >= config.patience:
                    progress.stopped_early = True

            # logging and checkpoint
            record = {
                "event": "epoch",
                "epoch": epoch,
                "step": epoch * self.sampler.steps_per_epoch,
                "train_loss": train_loss,
                "lr": last_lr,
                **{f"val_{key}": value for key, value in val_metrics.items()},
                "best": improved,
                "seconds": round(time.perf_counter() - started, 3),
            }
            progress.epoch = epoch
            progress.history.append(record)
            self.records.append(record)
            self._log_epoch(record, val_metrics)
            self._save(progress, improved=improved)
            barrier()

            if progress.stopped_early:
                _logger.info(
                    "early stopping after epoch %d: %s has not improved for %d epochs (best %.4f at epoch %d)",
                    epoch, config.monitor, config.patience, progress.best_metric, progress.best_epoch,
                )
                break
            if config.stop_after_epoch is not None and epoch >= config.stop_after_epoch and epoch < config.epochs:
                finished = False
                _logger.info("stopping after epoch %d as requested, continue with --resume", epoch)
                break

        export_dir = self._finish() if finished and config.export else None
        return FinetuneResult(
            out_dir=self.out_dir,
            epoch=progress.epoch,
            finished=finished,
            stopped_early=progress.stopped_early,
            best_epoch=progress.best_epoch,
            best_metric=progress.best_metric,
            history=progress.history,
            export_dir=export_dir,
        )

    def _train_epoch(self, epoch: int) -> tuple[float, float]:
        """Run one epoch and return the mean training loss and the learning rate of the last step."""
        config = self.config
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.loader_generator.manual_seed(config.seed + epoch)
        accumulation = config.accumulation_steps
        # Each rank's loss is a sum over its micro-batch scaled so that DDP's gradient average over
        # ranks and the sum over accumulation steps give the mean over the global batch.
        loss_scale = self.context.world_size / config.batch_size
        epoch_loss, steps = 0.0, 0
        lr = self.optimizer.param_groups[-1]["lr"]
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)

        batches = tqdm(
            self.train_loader, desc=f"epoch {epoch}", unit="batch", disable=not (config.progress and self.context.is_main)
        )
        for micro, (images, labels, _) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            last_micro = (micro + 1) % accumulation == 0
            sync = contextlib.nullcontext()
            if not last_micro and isinstance(self.model, DistributedDataParallel):
                sync = self.model.no_sync()

            # forward and backward
            with sync:
                with autocast(self.device, self.precision):
                    logits = self.model(images)
                per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
                if self.class_weights is not None:
                    per_sample = per_sample * self.class_weights[labels]
                loss = per_sample.sum() * loss_scale
                self.scaler.scale(loss).backward()
            step_loss += per_sample.detach().sum().double()
            if not last_micro:
                continue

            # optimiser step
            if config.max_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.optimizer.param_groups[-1]["lr"]
            self.scheduler.step()

            # global mean loss of this step
            mean_loss = float(all_reduce_sum(step_loss).item()) / config.batch_size
            step_loss.zero_()
            if not math.isfinite(mean_loss):
                raise TrainingDivergedError(
                    f"the training loss is {mean_loss} at epoch {epoch}, step {steps + 1}: lower the learning rate "
                    f"(now {config.resolved_lr:g}), set max_grad_norm, or use precision bf16 or fp32"
                )
            steps += 1
            epoch_loss += mean_loss
            global_step = (epoch - 1) * self.sampler.steps_per_epoch + steps
            self.records.append({"event": "step", "epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr})
            _logger.debug("epoch %d step %d loss %.5f lr %.3g", epoch, global_step, mean_loss, lr)
            batches.set_postfix(loss=f"{mean_loss:.4f}")
        return epoch_loss / max(steps, 1), lr

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Score this rank's share of the validation tiles and gather all shares on every rank."""
        assert self.val_dataset is not None
        self.classifier.eval()
        indices = list(range(self.context.rank, len(self.val_dataset), self.context.world_size))
        loader = DataLoader(
            self.val_dataset,
            sampler=indices,
            batch_size=self.sampler.micro_batch_size,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        local_logits, local_indices = [], []
        for images, _, index in loader:
            with autocast(self.device, self.precision):
                logits = self.classifier(images.to(self.device, non_blocking=True))
            local_logits.append(logits.float().cpu().numpy())
            local_indices.append(index.numpy())
        empty = np.zeros((0, self.classifier.head.out_features), dtype=np.float32)
        shard = (
            np.concatenate(local_indices) if local_indices else np.zeros(0, dtype=np.int64),
            np.concatenate(local_logits) if local_logits else empty,
        )

        # Every rank computes the same metrics, so early-stopping decisions agree without a broadcast.
        shards = all_gather_objects(shard)
        order = np.concatenate([s[0] for s in shards])
        logits = np.concatenate([s[1] for s in shards])[np.argsort(order)]
        return classification_metrics(logits, self.val_dataset.table.labels, self.classifier.head.out_features)

    # -- output --------------------------------------------------------------------------------

    def _log_epoch(self, record: dict[str, Any], val_metrics: dict[str, float]) -> None:
        if not self.context.is_main:
            return
        val_text = ", ".join(f"val {key} {value:.4f}" for key, value in val_metrics.items()) or "no validation"
        _logger.info(
            "epoch %d/%d: train loss %.4f, %s, lr %.3g, %.1f s%s",
            record["epoch"], self.config.epochs, record["train_loss"], val_text, record["lr"], record["seconds"],
            " (best)" if record["best"] else "",
        )

    def _finish(self) -> Path:
        export_dir = self.out_dir / "export"
        if self.context.is_main:
            best_path = self.out_dir / "best.pt"
            if self.val_dataset is not None and best_path.is_file():
                best = load_checkpoint(best_path)
                load_trainable_state_dict(self.classifier, best["trainable"])
                _logger.info("exporting the weights of epoch %d, the best by validation %s", best["epoch"], self.config.monitor)
            else:
                _logger.info("exporting the weights of the last epoch")
            export_classifier(self.classifier, self.split.classes, export_dir, extra=self._export_record())
        barrier()
        return export_dir

    def _export_record(self) -> dict[str, Any]:
        return {
            "finetune": {
                "mode": self.config.mode,
                "embedding": self.config.embedding,
                "classes": self.split.classes,
                "base_weights": self.base_weights.to_attrs(),
                "virchow_version": __version__,
            }
        }

