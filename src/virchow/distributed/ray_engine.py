"""``embed-slides --engine ray``: the slide pipeline spread over a Ray cluster.

Ray places the model replicas (:class:`~virchow.distributed.replica.EmbedReplica` actors, one
per GPU with ``num_gpus=1``, or a configurable number on CPUs), restarts a replica whose process
dies, and moves results back. The driver (this process) keeps the bookkeeping of the local
engine. It skips slides whose output is current and takes the per-slide lock while a slide is in
flight. It hands each slide to a replica, retries a slide whose replica died a bounded number of
times, and records every outcome in the manifest with ``upsert_outcome``. Replicas write the
same feature files with the same atomic rename, so outputs match the local engine.

Every node must see the slides and the output folder at the same paths (a shared file system).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import ray

from virchow.distributed._driver import NO_REPLICAS, WORKER_DIED, JobDriver, ReplicaStartError
from virchow.distributed.options import EmbedderSpec, RayEngineOptions, plan_replica_layout
from virchow.distributed.summary import RaySummary, ReplicaStats
from virchow.errors import ConfigError
from virchow.io.h5 import remove_stale_temporaries
from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput, discover_slides
from virchow.pipeline.manifest import SlideOutcome, upsert_outcome
from virchow.pipeline.runner import MANIFEST_NAME
from virchow.pipeline.slide import FEATURES_DIR

__all__ = [
    "NO_REPLICAS",
    "WORKER_DIED",
    "RaySummary",
    "ReplicaStartError",
    "ReplicaStats",
    "embed_slides_ray",
    "embed_slides_with_ray",
]

_logger = logging.getLogger(__name__)


def embed_slides_ray(args: argparse.Namespace, config: SlideJobConfig) -> RaySummary:
    """Run ``embed-slides`` with the parsed command-line options on a Ray cluster."""
    return embed_slides_with_ray(
        args.inputs,
        args.out,
        EmbedderSpec.from_args(args),
        config,
        options=RayEngineOptions.from_args(args),
        progress=not args.no_progress,
    )


def embed_slides_with_ray(
    inputs: Sequence[str | Path] | Sequence[SlideInput],
    out_dir: str | Path,
    spec: EmbedderSpec,
    config: SlideJobConfig | None = None,
    *,
    options: RayEngineOptions | None = None,
    progress: bool = True,
) -> RaySummary:
    """Embed every slide of ``inputs`` into ``out_dir/features/<slide_id>.h5`` on a Ray cluster.

    Args:
        inputs: slide files, folders, CSV manifests, or already discovered :class:`SlideInput`;
            every node must see them at the same paths.
        out_dir: output folder on storage shared by every node. Other jobs, local or Ray, may
            use it at the same time because the per-slide locks keep them apart.
        spec: the model each replica loads.
        config: tiling and storage settings; defaults when None.
        options: replicas, retries and the cluster address; defaults when None.
        progress: show a progress bar of slides.

    Returns:
        The run summary. A failing slide never stops the run: it is recorded with its reason,
        ``worker_died`` when its replica process died on every attempt.

    Raises:
        ConfigError: no slides were found, or the cluster cannot run the replicas.
        ReplicaStartError: the model could not be loaded, or no replica started in time.
    """
    started = time.perf_counter()
    config = config or SlideJobConfig()
    options = options or RayEngineOptions()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    slides, unsupported = _discover(inputs)

    # Files and rows that do not need the cluster, exactly as the local engine writes them.
    features_dir = out_dir / FEATURES_DIR
    if features_dir.is_dir():
        for stale in remove_stale_temporaries(features_dir):
            _logger.warning("removed %s, left by an interrupted run", stale.name)
    manifest = out_dir / MANIFEST_NAME
    for path in unsupported:
        upsert_outcome(manifest, SlideOutcome(slide_id=path.name, path=str(path), status="skipped", reason="unsupported_format"))

    with _connect(options.address):
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        layout = plan_replica_layout(spec, options, config.read_workers, nodes)
        _logger.info("embedding %d slides into %s with %s", len(slides), out_dir, layout.describe())
        driver = JobDriver(slides, out_dir, spec.on_device(layout.device), config, options, layout, started)
        summary = driver.run(progress=progress)

    summary.unsupported = list(unsupported)
    summary.seconds = time.perf_counter() - started
    if features_dir.is_dir():
        remove_stale_temporaries(features_dir)
    _logger.info("%s", summary.describe())
    for line in summary.describe_cluster():
        _logger.info("%s", line)
    for outcome in summary.failed:
        _logger.error("failed: %s (%s): %s", outcome.slide_id, outcome.reason, outcome.message)
    return summary


def _discover(inputs: Sequence[str | Path] | Sequence[SlideInput]) -> tuple[list[SlideInput], list[Path]]:
    if inputs and all(isinstance(item, SlideInput) for item in inputs):
        # Replicas run in other working directories, so relative paths would point elsewhere there.
        return [_absolute(slide) for slide in inputs], []  # type: ignore[arg-type]
    discovery = discover_slides(inputs)  # type: ignore[arg-type]
    if not discovery.slides:
        raise ConfigError(f"no slides found in {', '.join(map(str, inputs))}")
    return discovery.slides, discovery.skipped


def _absolute(slide: SlideInput) -> SlideInput:
    mask = slide.mask.resolve() if slide.mask is not None else None
    return replace(slide, path=slide.path.resolve(), mask=mask)


@contextlib.contextmanager
def _connect(address: str | None) -> Iterator[None]:
    """Use this process's Ray connection, or connect for the job and disconnect after it."""
    if ray.is_initialized():
        _logger.info("using the existing Ray connection of this process")
        yield
        return
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError) as exc:  # unreachable cluster, or an address Ray cannot parse
        raise ConfigError(
            f"cannot connect to the Ray cluster at {address}: {exc}. Start it with `ray start --head` "
            "or pass its address (HOST:PORT of the head node) with --ray-address"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()
