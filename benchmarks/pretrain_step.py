"""Time one pretraining step of a registered variant and record its peak memory.

One step is what ``virchow pretrain`` does per iteration: teacher forward on the global crops,
student forward on all crops, backward, gradient clipping, AdamW update and teacher EMA. Inputs are
random crops, so data loading is not included. The script also counts the floating-point
operations of the step with ``torch.utils.flop_counter`` (matrix products and attention only).

Usage:
    python benchmarks/pretrain_step.py --model virchow2 --images 1 --n-local 4 --steps 2
    python benchmarks/pretrain_step.py --model virchow2 --device cuda --precision bf16 --images 32

Prints one JSON object: seconds per phase of the last step, peak memory (resident set on the CPU,
allocated memory on CUDA), parameter counts and FLOPs per step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="virchow2", help="registry name (default: virchow2)")
    parser.add_argument("--images", type=int, default=1, help="images per step; each gives 2 global crops (default: 1)")
    parser.add_argument("--n-local", type=int, default=4, help="local crops per image (default: 4)")
    parser.add_argument("--steps", type=int, default=2, help="steps to run; the last one is reported (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--prototypes", type=int, default=65536, help="prototypes of each head (default: 65536)")
    parser.add_argument(
        "--regularizer", default="koleo", choices=("koleo", "kde", "none"),
        help="uniformity regulariser; it needs 2 images, so with --images 1 it is always none (default: koleo)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it runs one extra step)")
    return parser.parse_args(argv)


def peak_memory_gib(device: torch.device) -> float:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from virchow.embed.device import autocast
    from virchow.pretrain import sharding
    from virchow.pretrain.config import load_config
    from virchow.pretrain.meta_arch import SelfDistillation, build_networks, update_teacher
    from virchow.pretrain.optim import apply_schedules, build_optimizer
    from virchow.pretrain.schedules import build_schedules

    device = torch.device(args.device)
    regularizer = args.regularizer if args.images > 1 else "none"
    cfg = load_config(
        None,
        [
            f"model.name={args.model}",
            f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}",
            f"dino.head.n_prototypes={args.prototypes}",
            f"ibot.head.n_prototypes={args.prototypes}",
            f"crops.n_local={args.n_local}",
            f"train.batch_size_per_rank={args.images}",
            f"regularizer.kind={regularizer}",
            "data.tile_dirs=[unused]",
        ],
    )

    # networks, optimiser and random inputs
    torch.manual_seed(0)
    build_start = time.perf_counter()
    student, teacher, spec = build_networks(cfg)
    student.to(device)
    teacher.to(device)
    objective = SelfDistillation(cfg, args.n_local).to(device)
    optimizer = build_optimizer(student.named_parameters(), cfg, depth=len(student.backbone.blocks))
    schedules = build_schedules(cfg, args.images)
    build_seconds = time.perf_counter() - build_start
    global_crops = torch.randn(2 * args.images, 3, cfg.crops.global_size, cfg.crops.global_size, device=device)
    local_crops = torch.randn(args.n_local * args.images, 3, cfg.crops.local_size, cfg.crops.local_size, device=device)
    n_patches = (cfg.crops.global_size // 14) ** 2
    masks = torch.zeros(2 * args.images, n_patches, dtype=torch.bool, device=device)
    masks[:, : n_patches // 4] = True  # a quarter of the patches of every global crop
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> dict[str, float]:
        times: dict[str, float] = {}
        start = time.perf_counter()
        apply_schedules(optimizer, schedules, 5000)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            out = objective(student, teacher, global_crops, local_crops, masks, 0.07)
        synchronise()
        times["forward_s"] = time.perf_counter() - start
        mark = time.perf_counter()
        scaler.scale(out.loss).backward()
        synchronise()
        times["backward_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        scaler.unscale_(optimizer)
        sharding.clip_gradients(student, 3.0)
        scaler.step(optimizer)
        scaler.update()
        update_teacher(student, teacher, 0.994)
        synchronise()
        times["optimizer_and_ema_s"] = time.perf_counter() - mark
        times["step_s"] = time.perf_counter() - start
        return times

    # timed steps
    for _ in range(args.steps):
        times = step()

    flops = None
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()

    backbone_params = sum(p.numel() for p in student.backbone.parameters())
    head_params = sum(p.numel() for p in student.parameters()) - backbone_params
    result = {
        "model": args.model,
        "images": args.images,
        "global_crops": 2 * args.images,
        "local_crops": args.n_local * args.images,
        "precision": args.precision,
        "regularizer": regularizer,
        "grad_checkpointing": args.grad_checkpointing,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "backbone_params_m": round(backbone_params / 1e6, 1),
        "head_params_m": round(head_params / 1e6, 1),
        "build_s": round(build_seconds, 1),
        **{key: round(value, 2) for key, value in times.items()},
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "step_tflops": round(flops / 1e12, 3) if flops is not None else None,
        "torch": torch.__version__,
        "spec": spec.name,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
