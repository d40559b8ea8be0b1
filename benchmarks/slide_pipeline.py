"""End-to-end embed-slides throughput against embedding alone, on the bundled sample slide.

Measures, in one run with the full-size Virchow (random weights, bf16 on the CPU unless a GPU is
present): the whole `virchow embed-slides` command including model loading (the README's main
job), the time spent in tissue detection and tiling, embedding-only tiles/s on tiles already in
memory, and end-to-end tiles/s with reads overlapped with compute. Pipeline efficiency is the
ratio of the last two.

Usage:
    python -m benchmarks.slide_pipeline [--slide PATH] [--batch-size 16] [--write]
"""

from __future__ import annotations

import argparse
import csv
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._report import machine_line, update_section
from virchow.embed import Embedder
from virchow.embed.device import resolve_device
from virchow.models import load_model
from virchow.pipeline import SlideInput, SlideJobConfig
from virchow.pipeline.slide import embed_planned_slide, plan_slide
from virchow.wsi.tiling import read_tile

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def whole_command(slide: Path, out: Path, precision: str, batch_size: int) -> tuple[float, int, float]:
    """Run the CLI as a new process; return wall seconds, tiles, and the tiles/s it recorded."""
    command = [sys.executable, "-m", "virchow", "-q", "embed-slides", str(slide), "--out", str(out), "--model", "virchow",
               "--weights", "random:0", "--precision", precision, "--batch-size", str(batch_size), "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    row = next(csv.DictReader((out / "manifest.csv").open()))
    return seconds, int(row["tiles"]), float(row["tiles_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=SAMPLE)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each kind (default: 2)")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    device = resolve_device("auto")
    precision = "fp16" if device.type == "cuda" else "bf16"
    work = Path(tempfile.mkdtemp(prefix="virchow-bench-"))

    # 1. The whole command, as a user runs it (includes Python start-up and model loading).
    command_seconds, command_tiles, command_rate = whole_command(args.slide, work / "cli", precision, args.batch_size)

    # 2. The same job in this process, phase by phase.
    load_started = time.perf_counter()
    embedder = Embedder(load_model("virchow", "random:0", device=device), device=device, precision=precision,
                        batch_size=args.batch_size, compile="off")
    load_seconds = time.perf_counter() - load_started
    config = SlideJobConfig()
    slide = SlideInput(args.slide, args.slide.stem)
    plan = plan_slide(slide, config, work / "inprocess")
    tiles = np.stack([read_tile(plan.reader, plan.resolution, tuple(xy)) for xy in plan.grid.coords])
    embedder.embed_tiles(tiles[: args.batch_size])  # warm-up

    # Alternate the two measurements and keep the best of each, so that load from other processes on
    # the machine affects both alike.
    embed_only = end_to_end = 0.0
    for attempt in range(args.repeats):
        started = time.perf_counter()
        embedder.embed_tiles(tiles)
        embed_only = max(embed_only, len(tiles) / (time.perf_counter() - started))

        started = time.perf_counter()
        out = work / "inprocess" / f"features-{attempt}.h5"
        outcome = embed_planned_slide(plan, config, embedder, out, "bench", progress=False)
        end_to_end = max(end_to_end, outcome.tiles / (time.perf_counter() - started))
    plan.reader.close()

    lines = [
        "## Whole-slide pipeline (embed-slides) on the sample slide",
        "",
        f"`benchmarks/slide_pipeline.py`, `{args.slide.name}` ({len(tiles)} tiles at 0.5 um/px), full-size Virchow "
        f"with random weights, {precision} on {device}, batch {args.batch_size}. Machine: {machine_line()}.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| whole command wall time (`virchow embed-slides`, including start-up and model loading) | {command_seconds:.1f} s |",
        f"| tiles/s recorded by that command (per slide, from opening the slide to the written file) | {command_rate:.2f} |",
        f"| model build and weight loading, in process | {load_seconds:.1f} s |",
        f"| tissue detection, tiling and QC files | {plan.plan_seconds:.2f} s |",
        f"| embedding only (tiles already in memory), best of {args.repeats} | {embed_only:.2f} tiles/s |",
        f"| end to end (region reads in 2 threads overlapped with the model, HDF5 write), best of {args.repeats} | {end_to_end:.2f} tiles/s |",
        f"| pipeline efficiency (end to end / embedding only) | {end_to_end / embed_only:.2f} |",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if command_tiles != len(tiles):
        print(f"warning: the command embedded {command_tiles} tiles, the in-process plan has {len(tiles)}")
    if args.write:
        update_section("slide_pipeline", markdown)


if __name__ == "__main__":
    main()
