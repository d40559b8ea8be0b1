"""Tiles/s of the full-size Virchow on this machine: precisions, batch sizes, compiled, reference loop.

The reference is the model card's recipe: a timm model, the PIL transform per image and autocast.
The ceiling is the measured bf16 (or fp32) matrix-multiply rate divided by about 335 GFLOP per
224 x 224 tile (2 x 631M parameters x 261 tokens plus attention, forward only).

Usage:
    python -m benchmarks.embed_throughput [--tiles 16] [--batch-sizes 1 8 16] [--no-compile] [--write]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from benchmarks._report import machine_line, update_section
from virchow.embed import Embedder
from virchow.embed.device import autocast, cpu_supports_bf16, resolve_device
from virchow.models import get_model_spec, load_model, timm_kwargs

GFLOP_PER_TILE = 335.0
TILES_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiles" / "labeled" / "CRC-VAL-HE-7K"


def matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Return the measured dense matrix-multiply rate in GFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def load_tiles(count: int) -> list[Image.Image]:
    paths = sorted(TILES_DIR.rglob("*.png"))
    return [Image.open(paths[i % len(paths)]).convert("RGB") for i in range(count)]


def time_it(fn, tiles: int, warmup=None) -> float:
    """Return tiles/s of ``fn()``, after one call of ``warmup`` (or of ``fn`` itself)."""
    (warmup or fn)()
    started = time.perf_counter()
    fn()
    return tiles / (time.perf_counter() - started)


def reference_loop(images: list[Image.Image], batch_size: int, device: torch.device, precision: str) -> float:
    """Model-card loop: timm model, PIL transform per image, autocast, CLS + mean of patch tokens."""
    spec = get_model_spec("virchow")
    torch.manual_seed(0)
    model = timm.create_model(spec.architecture, pretrained=False, **timm_kwargs(spec)).eval().to(device)
    config = timm.data.resolve_data_config(
        {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0, "mean": spec.preprocess.mean,
         "std": spec.preprocess.std}
    )
    transform = timm.data.create_transform(**config)

    def run() -> None:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[start : start + batch_size]]).to(device)
            with torch.inference_mode(), autocast(device, precision):
                out = model(batch)
            torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1).float()

    return time_it(run, len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=16, help="tiles per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = resolve_device(args.device)
    images = load_tiles(args.tiles)
    tiles = np.stack([np.asarray(image) for image in images])
    if device.type == "cuda":
        fast_precision = "fp16"
    elif cpu_supports_bf16():
        fast_precision = "bf16"
    else:
        fast_precision = "fp32"
    ceiling_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[fast_precision]
    gflops = matmul_gflops(ceiling_dtype, device)
    ceiling = gflops / GFLOP_PER_TILE
    loaded = load_model("virchow", "random:0", device=device)

    rows: list[tuple[str, str, int, float]] = []
    reference_batch = 8 if 8 in args.batch_sizes else args.batch_sizes[0]
    reference = reference_loop(images, reference_batch, device, fast_precision)
    rows.append(("model-card loop (PIL transform, autocast)", fast_precision, reference_batch, reference))
    for precision in ("fp32", "bf16", "fp16"):
        # fp16 autocast on CPUs without fp16 matrix units is about 10x slower: measure it once, on fewer tiles.
        slow = precision == "fp16" and device.type == "cpu"
        batch_sizes = [reference_batch] if slow else args.batch_sizes
        subset = tiles[: max(2, len(tiles) // 4)] if slow else tiles
        for batch_size in batch_sizes:
            embedder = Embedder(loaded, device=device, precision=precision, batch_size=batch_size, compile="off")
            rate = time_it(
                lambda e=embedder, t=subset: e.embed_tiles(t), len(subset), warmup=lambda e=embedder: e.embed_tiles(tiles[:1])
            )
            rows.append(("virchow Embedder (uint8 tensor path)", precision, batch_size, rate))
            print(f"{precision} batch {batch_size}: {rate:.2f} tiles/s", flush=True)
    if not args.no_compile and device.type == "cpu" and fast_precision == "bf16":
        batch_size = reference_batch
        started = time.perf_counter()
        embedder = Embedder(loaded, device=device, precision="bf16", batch_size=batch_size, compile="on")
        compile_seconds = time.perf_counter() - started
        rate = time_it(lambda: embedder.embed_tiles(tiles), len(tiles))
        rows.append((f"virchow Embedder, torch.compile (freezing; {compile_seconds:.0f} s compile)", "bf16", batch_size, rate))

    lines = [
        "## Tile embedding throughput (full-size Virchow)",
        "",
        f"`benchmarks/embed_throughput.py`, {len(images)} tiles of 224 x 224 per measurement, random weights. "
        f"Machine: {machine_line()}.",
        "",
        f"Measured {ceiling_dtype} matrix-multiply rate: {gflops:.0f} GFLOP/s, so the ceiling is "
        f"{ceiling:.2f} tiles/s at {GFLOP_PER_TILE:.0f} GFLOP per tile.",
        "",
        "| path | precision | batch | tiles/s | vs reference | fraction of ceiling |",
        "|---|---|---|---|---|---|",
    ]
    for name, precision, batch_size, rate in rows:
        lines.append(f"| {name} | {precision} | {batch_size} | {rate:.2f} | {rate / reference:.2f}x | {rate / ceiling:.0%} |")
    auto = "compile=auto compiles on CPUs under bf16 for jobs of at least 1000 tiles (virchow.embed.embedder.COMPILE_MIN_TILES)."
    lines += ["", auto]
    markdown = "\n".join(lines)
    print(markdown)
    if args.write:
        update_section("embed_throughput", markdown)


if __name__ == "__main__":
    main()
