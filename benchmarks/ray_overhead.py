"""Tiles/s of ``embed-slides --engine ray`` against the local engine on one machine, in one run.

Starts a one-node Ray cluster bound to 127.0.0.1 (dashboard off, usage stats off). Embeds the same
copies of the bundled sample slide with both engines and the same model, and checks that the
features agree. Prints Markdown tables and shuts the cluster down. With the test model, every
configuration runs once per round and the rounds are interleaved, so a change in the machine's
load during the run affects all of them alike. The tables give the median and the range over
the rounds.

A second table compares where tiles are read, without a model: threads inside the consuming
process (what the engine does, through ``TileStream``) against Ray CPU tasks that read regions
and pass the tiles through the object store to a consuming actor. Both get the same CPUs.

Model loading is timed apart from embedding: "embedding" tiles/s counts from the first loaded model
to the last written file (for Ray, after the first replica is ready), "whole job" includes loading
the model (for Ray, starting the replica processes and loading the model in them).

Usage:
    python -m benchmarks.ray_overhead [--copies 4] [--rounds 3] [--skip-full-model]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from benchmarks._report import machine_line

SAMPLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "wsi" / "CMU-1-Small-Region.svs"
TEST_MODEL = {"model": "virchow-test", "weights": "random:0", "precision": "fp32", "batch_size": 16}
FULL_MODEL = {"model": "virchow", "weights": "random:0", "precision": "bf16", "batch_size": 16}


@dataclass
class Measurement:
    """One engine run: what ran and how long its phases took."""

    engine: str
    model: str
    slides: int
    tiles: int
    layout: str
    in_flight: int
    startup_s: float
    embed_s: float
    max_difference: float | None = None

    @property
    def embed_rate(self) -> float:
        return self.tiles / self.embed_s if self.embed_s else 0.0

    @property
    def whole_rate(self) -> float:
        return self.tiles / (self.startup_s + self.embed_s)


def run_local(slides: Path, out: Path, model: dict, *, in_thread: bool = False) -> Measurement:
    """Load the model in this process and run the local engine, in the main thread unless ``in_thread``."""
    if in_thread:
        with ThreadPoolExecutor(1) as pool:
            row = pool.submit(run_local, slides, out, model).result()
        row.engine = "local, worker thread"
        return row
    from virchow.embed import create_embedder
    from virchow.pipeline import SlideJobConfig, embed_slides

    started = time.perf_counter()
    embedder = create_embedder(model["model"], model["weights"], device="cpu", precision=model["precision"],
                               batch_size=model["batch_size"], compile="off")
    loaded = time.perf_counter()
    summary = embed_slides([slides], out, embedder, SlideJobConfig(), progress=False)
    finished = time.perf_counter()
    assert summary.ok, [o.message for o in summary.failed]
    del embedder
    gc.collect()
    count = len(summary.outcomes)
    return Measurement("local, main thread", model["model"], count, summary.tiles, f"1 process, {os.cpu_count()} CPUs", 1,
                       loaded - started, finished - loaded)


def run_ray(slides: Path, out: Path, model: dict, *, replicas: int, cpus: int, in_flight: int) -> Measurement:
    """Run the Ray engine on the cluster this process is connected to."""
    from virchow.distributed import EmbedderSpec, RayEngineOptions
    from virchow.distributed.ray_engine import embed_slides_with_ray

    spec = EmbedderSpec(model["model"], model["weights"], device="cpu", precision=model["precision"],
                        batch_size=model["batch_size"], compile="off")
    options = RayEngineOptions(replicas=replicas, cpus_per_replica=cpus, slides_per_replica=in_flight)
    summary = embed_slides_with_ray([slides], out, spec, options=options, progress=False)
    assert summary.ok, [o.message for o in summary.failed]
    count = len(summary.outcomes)
    return Measurement("ray", model["model"], count, summary.tiles, f"{replicas} x {cpus}-CPU replica", in_flight,
                       summary.startup_seconds, summary.seconds - summary.startup_seconds)


def max_difference(reference: Path, other: Path) -> float:
    """Return the largest absolute feature difference between two output folders (coordinates must match)."""
    worst = 0.0
    for path in sorted((reference / "features").glob("*.h5")):
        with h5py.File(path) as a, h5py.File(other / "features" / path.name) as b:
            assert np.array_equal(a["coords"][:], b["coords"][:]), path.name
            worst = max(worst, float(np.abs(a["features"][:] - b["features"][:]).max()))
    return worst


def plan_tiles_of(slides: Path) -> list[tuple[str, object, list]]:
    """Plan every slide of ``slides`` (no QC files) and group its tiles into region reads."""
    from virchow.pipeline import SlideJobConfig
    from virchow.pipeline.inputs import discover_slides
    from virchow.pipeline.slide import plan_slide
    from virchow.wsi.tiling import group_tiles_into_regions

    config = SlideJobConfig(qc=False)
    planned = []
    for slide in discover_slides([slides]).slides:
        plan = plan_slide(slide, config, slides)
        groups = group_tiles_into_regions(plan.reader, plan.resolution, plan.grid.coords, tiles_per_side=config.region_tiles)
        planned.append((str(slide.path), plan.resolution, [(xy, plan.grid.coords[idx]) for xy, idx in groups]))
        plan.reader.close()
    return planned


def read_regions(path: str, resolution: object, groups: list) -> np.ndarray:
    """Read the tiles of some region groups of one slide (runs as a Ray task)."""
    from virchow.wsi.readers import open_slide
    from virchow.wsi.tiling import read_tiles_from_region

    with open_slide(Path(path)) as reader:
        return np.concatenate([read_tiles_from_region(reader, resolution, xy, coords) for xy, coords in groups])


class TileConsumer:
    """Receive tiles and count them, standing in for a model replica (runs as a Ray actor)."""

    def __init__(self) -> None:
        self.tiles = 0

    def take(self, tiles: np.ndarray) -> int:
        self.tiles += len(tiles)
        return self.tiles

    def read_with_threads(self, planned: list, workers: int) -> int:
        """Read every planned slide with a :class:`TileStream` of ``workers`` threads in this process."""
        from virchow.pipeline.tile_stream import TileStream
        from virchow.wsi.readers import open_slide

        for path, resolution, groups in planned:
            coords = np.concatenate([c for _, c in groups])
            with open_slide(Path(path)) as reader:
                stream = TileStream(lambda p=path: open_slide(Path(p)), reader, resolution, coords, workers=workers)
                for _, tiles in stream:
                    self.tiles += len(tiles)
        return self.tiles


def measure_read_placement(ray: object, planned: list, cpus: int) -> list[tuple[str, int, float]]:
    """Return (placement, tiles, tiles/s) for reads in threads of the consumer and in Ray CPU tasks.

    Each consumer first reads the first slide untimed, so that imports and process start-up
    are not counted.
    """
    results = []

    # Threads inside the consuming process, which reserves all CPUs (the engine's design).
    consumer = ray.remote(num_cpus=cpus)(TileConsumer).remote()
    ray.get(consumer.read_with_threads.remote(planned[:1], cpus))
    started = time.perf_counter()
    tiles = ray.get(consumer.read_with_threads.remote(planned, cpus)) - planned_tiles(planned[:1])
    results.append((f"{cpus} threads in the consuming process", tiles, tiles / (time.perf_counter() - started)))
    ray.kill(consumer)

    # One-CPU read tasks, 4 regions each, whose tiles go through the object store to a consumer.
    consumer = ray.remote(num_cpus=0)(TileConsumer).remote()
    reader_task = ray.remote(num_cpus=1)(read_regions)

    def read_all(slides: list) -> int:
        calls = [
            consumer.take.remote(reader_task.remote(path, resolution, groups[start : start + 4]))
            for path, resolution, groups in slides
            for start in range(0, len(groups), 4)
        ]
        return max(ray.get(calls))

    warmup = read_all(planned[:1])
    started = time.perf_counter()
    tiles = read_all(planned) - warmup
    results.append((f"1-CPU Ray tasks (up to {cpus} at once) through the object store", tiles,
                    tiles / (time.perf_counter() - started)))
    ray.kill(consumer)
    return results


def planned_tiles(planned: list) -> int:
    """Return the number of tiles of planned slides."""
    return sum(len(coords) for _, _, groups in planned for _, coords in groups)


def table(rows: list[Measurement]) -> str:
    """Format the runs as a Markdown table: one line per configuration, medians over its rounds."""
    groups: dict[tuple[str, str, str, int], list[Measurement]] = {}
    for row in rows:
        groups.setdefault((row.engine, row.model, row.layout, row.in_flight), []).append(row)
    local = {model: float(np.median([r.embed_rate for r in runs]))
             for (engine, model, _, _), runs in groups.items() if engine == "local, main thread"}
    lines = [
        "| engine | model | layout | slides in flight | rounds | slides x tiles | start-up s | tiles/s embedding "
        "(min-max) | tiles/s whole job | embedding tiles/s vs local | max abs feature difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (engine, model, layout, in_flight), runs in groups.items():
        embed = [r.embed_rate for r in runs]
        median = float(np.median(embed))
        differences = [r.max_difference for r in runs if r.max_difference is not None]
        difference = f"{max(differences):.1e}" if differences else "reference"
        lines.append(
            f"| {engine} | {model} | {layout} | {in_flight} | {len(runs)} | {runs[0].slides} x {runs[0].tiles // runs[0].slides} "
            f"| {np.median([r.startup_s for r in runs]):.1f} | {median:.2f} ({min(embed):.2f}-{max(embed):.2f}) "
            f"| {np.median([r.whole_rate for r in runs]):.2f} | {median / local[model] - 1:+.1%} | {difference} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the sample slide for the test model (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds with the test model (default: 3)")
    parser.add_argument("--skip-full-model", action="store_true", help="skip the full-size Virchow (bf16) on one copy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Ray rewrites 127.0.0.1 to the host's routable IP unless it runs in single-host mode; both
    # variables must be set before Ray is imported.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="virchow-ray-bench-"))
    many = work / "slides"  # several copies of the sample
    many.mkdir()
    for index in range(args.copies):
        shutil.copyfile(SAMPLE, many / f"copy{index}.svs")
    one = work / "one"
    one.mkdir()
    shutil.copyfile(SAMPLE, one / "copy0.svs")

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024,
        "include_dashboard": False,
    })
    rows: list[Measurement] = []
    placements: list[tuple[str, int, float]] = []
    load_before = os.getloadavg()[0]
    try:
        ray.init(address=cluster.address)

        # 1. The test model on several copies, per round. The local engine runs from the main thread
        # (as the command line runs it) and from a worker thread (as a Ray replica runs it). Then
        # come three Ray layouts and the two places to read tiles.
        layouts = [(1, cpus, 1), (1, cpus, 2), (cpus, 1, 2)]
        planned = plan_tiles_of(many)
        for round_index in range(args.rounds):
            reference = work / f"local-{round_index}"
            rows.append(run_local(many, reference, TEST_MODEL))
            row = run_local(many, work / f"local-thread-{round_index}", TEST_MODEL, in_thread=True)
            row.max_difference = max_difference(reference, work / f"local-thread-{round_index}")
            rows.append(row)
            for replicas, replica_cpus, in_flight in layouts:
                out = work / f"ray-{round_index}-{replicas}x{replica_cpus}-{in_flight}"
                row = run_ray(many, out, TEST_MODEL, replicas=replicas, cpus=replica_cpus, in_flight=in_flight)
                row.max_difference = max_difference(reference, out)
                rows.append(row)
            placements.extend(measure_read_placement(ray, planned, cpus))

        # 2. The full-size model on one copy, once per engine (minutes per run on a few CPU cores).
        if not args.skip_full_model:
            rows.append(run_local(one, work / "full-local", FULL_MODEL))
            row = run_ray(one, work / "full-ray", FULL_MODEL, replicas=1, cpus=cpus, in_flight=1)
            row.max_difference = max_difference(work / "full-local", work / "full-ray")
            rows.append(row)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print("## Ray engine overhead on one machine (embed-slides)\n")
    print(f"`benchmarks/ray_overhead.py`, copies of `{SAMPLE.name}`, one-node Ray cluster on 127.0.0.1, CPU only, "
          f"fp32 test model and bf16 full-size Virchow, random weights. Machine: {machine_line()}. "
          f"Load average (1 min) {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end: other "
          "processes on the machine move the absolute numbers. 'vs local' compares median embedding tiles/s with "
          "the local engine's median for the same model.\n")
    print(table(rows))
    print("\n| where tiles are read (no model) | rounds | tiles per round | tiles/s delivered (min-max) |")
    print("|---|---|---|---|")
    by_placement: dict[str, list[tuple[int, float]]] = {}
    for placement, tiles, rate in placements:
        by_placement.setdefault(placement, []).append((tiles, rate))
    for placement, runs in by_placement.items():
        rates = [rate for _, rate in runs]
        print(f"| {placement} | {len(runs)} | {runs[0][0]} | {np.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) |")


if __name__ == "__main__":
    main()
