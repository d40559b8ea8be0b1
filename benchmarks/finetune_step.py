"""Peak memory and time of one full-size Virchow training step, per fine-tuning mode.

Each configuration runs in its own Python process, so the peak resident set size (RSS, from
``resource.getrusage``) belongs to that configuration alone. A process builds ``virchow`` (ViT-H/14,
632M parameters) with random weights, applies the mode through :mod:`virchow.finetune.modes`, and
runs one untimed warm-up step and ``--steps`` timed AdamW steps on random 224 x 224 images. The
table lists the RSS after the model was built, the peak RSS, and the mean seconds per step.

Usage (from the repository root):
    python -m benchmarks.finetune_step                      # lora and full, with and without checkpointing
    python -m benchmarks.finetune_step --modes lora --batch-size 1 --steps 3 [--write]

NOTE: the seconds depend on the CPU, the thread count and other load on the machine, so the table
gives the 1-minute load average at the end of each measurement. Memory does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_gib() -> float:
    # On Linux ru_maxrss is in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _current_rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_one(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process and return the result record."""
    import torch
    from torch.nn import functional as F

    from virchow.embed.device import autocast
    from virchow.finetune.config import FinetuneConfig
    from virchow.finetune.modes import TileClassifier, apply_mode, param_groups
    from virchow.models import load_model

    config = FinetuneConfig(
        data="unused", out_dir="unused", model=args.model, mode=args.mode, grad_checkpointing=args.checkpointing,
        precision=args.precision,
    )
    loaded = load_model(args.model, "random:0")
    classifier = TileClassifier(loaded.model, loaded.spec, config.embedding, num_classes=8)
    apply_mode(classifier, config)
    classifier.backbone.set_grad_checkpointing(args.checkpointing)
    classifier.train()
    groups = param_groups(classifier, config)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": 1e-4 * g["lr_scale"]} for g in groups]
    )
    trainable = sum(p.numel() for g in groups for p in g["params"])
    built_rss = _current_rss_gib()

    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=generator)
    labels = torch.randint(0, 8, (args.batch_size,), generator=generator)

    def step() -> float:
        started = time.perf_counter()
        with autocast(device, args.precision):
            logits = classifier(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    warmup = step()
    timings = [step() for _ in range(args.steps)]
    return {
        "mode": args.mode,
        "checkpointing": args.checkpointing,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "trainable_params": trainable,
        "built_rss_gib": round(built_rss, 2),
        "peak_rss_gib": round(_rss_gib(), 2),
        "warmup_s": round(warmup, 2),
        "seconds_per_step": round(sum(timings) / len(timings), 2),
        "threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 1),
    }


def _markdown(records: list[dict], args: argparse.Namespace) -> str:
    from benchmarks._report import machine_line

    lines = [
        "## One fine-tuning step of the full-size model (`benchmarks/finetune_step.py`)",
        "",
        f"{args.model} with random weights, batch {args.batch_size}, {args.precision}, AdamW, one process per row, "
        f"mean of {args.steps} steps after one warm-up step. {machine_line()}.",
        "",
        "| mode | gradient checkpointing | trainable parameters | RSS after build (GiB) | peak RSS (GiB) | s / step | load average |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        checkpointing = "on" if record["checkpointing"] else "off"
        if "error" in record:
            lines.append(f"| {record['mode']} | {checkpointing} | | | {record['error']} | | |")
            continue
        lines.append(
            f"| {record['mode']} | {checkpointing} | {record['trainable_params'] / 1e6:.1f} M | "
            f"{record['built_rss_gib']:.2f} | {record['peak_rss_gib']:.2f} | {record['seconds_per_step']:.1f} | "
            f"{record['load_average']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="virchow", help="registry name (default: virchow)")
    parser.add_argument("--modes", default="lora,full", help="comma-separated modes (default: lora,full)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (default: 2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (default: 2)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast precision (default: fp32)")
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of docs/benchmarks.md")
    # Internal: measure a single configuration in this process.
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode is not None:
        print(json.dumps(run_one(args)), flush=True)
        return 0

    records = []
    for mode in args.modes.split(","):
        for checkpointing in (False, True):
            command = [
                sys.executable, "-m", "benchmarks.finetune_step", "--model", args.model, "--mode", mode, "--batch-size", str(args.batch_size),
                "--steps", str(args.steps), "--precision", args.precision,
            ]
            if checkpointing:
                command.append("--checkpointing")
            print(f"running {mode}, checkpointing {'on' if checkpointing else 'off'} ...", file=sys.stderr, flush=True)
            completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
            if completed.returncode != 0:
                print(completed.stderr[-3000:], file=sys.stderr)
                records.append({"mode": mode, "checkpointing": checkpointing, "error": f"exit status {completed.returncode}"})
                continue
            records.append(json.loads(completed.stdout.strip().splitlines()[-1]))

    markdown = _markdown(records, args)
    print("\n" + markdown)
    if args.write:
        from benchmarks._report import update_section

        print(f"updated {update_section('finetune_step', markdown)}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
