"""Settings of the Ray engine of ``embed-slides``, importable without Ray."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from virchow.errors import ConfigError

if TYPE_CHECKING:
    from virchow.embed.embedder import CompileMode, Embedder


@dataclass(frozen=True)
class EmbedderSpec:
    """Model settings from which each replica builds its :class:`~virchow.embed.embedder.Embedder`.

    The spec travels to the Ray workers instead of the model, so each replica loads the weights
    itself on its own device. The fields mirror :func:`virchow.embed.embedder.create_embedder`.
    """

    model: str = "virchow"
    weights: str | None = None
    kind: str = "cls+mean"
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    compile: CompileMode = "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EmbedderSpec:
        """Build the spec from the options of :func:`virchow.cli._common.add_model_arguments`."""
        return cls(
            model=args.model,
            weights=args.weights,
            kind=args.embedding,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            compile=args.compile,
        )

    def on_device(self, device: str) -> EmbedderSpec:
        """Return a copy of the spec with ``device`` replaced."""
        return replace(self, device=device)

    def build(self) -> Embedder:
        """Load the model and wrap it in an embedder (runs inside a replica)."""
        from virchow.embed.embedder import create_embedder

        return create_embedder(
            self.model, self.weights, kind=self.kind, device=self.device, precision=self.precision,
            batch_size=self.batch_size, compile=self.compile,
        )


@dataclass(frozen=True)
class RayEngineOptions:
    """How a job is spread over a Ray cluster.

    Attributes:
        address: Ray cluster address (``HOST:PORT`` of the head's GCS, or ``auto``); None starts
            or joins a local instance as :func:`ray.init` does. Ignored when the calling process
            is already connected to Ray.
        replicas: model replicas to start; None means one per GPU of the cluster on GPU clusters,
            and on CPU clusters as many as the nodes' CPUs allow at ``cpus_per_replica`` each.
        cpus_per_replica: CPUs reserved by each replica. None means 1 plus the read threads for
            GPU replicas, and min(4, CPUs of the largest node) for CPU replicas, which also sets
            the replica's torch threads.
        slides_per_replica: slides in flight on one replica; 2 lets a replica plan its next slide
            (open, tissue detection, QC files) while its model embeds the current one.
        max_slide_retries: extra attempts of a slide whose replica process died while embedding it;
            after them the slide is recorded as failed with reason ``worker_died``.
        max_restarts: times Ray restarts each replica process after it dies.
        start_timeout_s: seconds to wait for the first replica to start (model loaded). The job
            also waits this long for a restart when no replica is running.
    """

    address: str | None = None
    replicas: int | None = None
    cpus_per_replica: float | None = None
    slides_per_replica: int = 2
    max_slide_retries: int = 2
    max_restarts: int = 8
    start_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"Ray replicas {self.replicas} must be at least 1")
        if self.cpus_per_replica is not None and self.cpus_per_replica <= 0:
            raise ConfigError(f"CPUs per replica {self.cpus_per_replica} must be positive")
        if self.slides_per_replica < 1:
            raise ConfigError(f"slides per replica {self.slides_per_replica} must be at least 1")
        if self.max_slide_retries < 0 or self.max_restarts < 0:
            raise ConfigError("max slide retries and max restarts must be at least 0")
        if self.start_timeout_s <= 0:
            raise ConfigError(f"replica start timeout {self.start_timeout_s} s must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RayEngineOptions:
        """Build the options from ``embed-slides`` arguments.

        Reads ``ray_address`` and, where the parser defines them, ``ray_replicas``,
        ``ray_cpus_per_replica``, ``ray_slides_per_replica``, ``ray_max_slide_retries`` and
        ``ray_max_restarts``. Fields without an argument keep their defaults.
        """
        defaults = cls()
        return cls(
            address=getattr(args, "ray_address", None),
            replicas=getattr(args, "ray_replicas", None),
            cpus_per_replica=getattr(args, "ray_cpus_per_replica", None),
            slides_per_replica=getattr(args, "ray_slides_per_replica", defaults.slides_per_replica),
            max_slide_retries=getattr(args, "ray_max_slide_retries", defaults.max_slide_retries),
            max_restarts=getattr(args, "ray_max_restarts", defaults.max_restarts),
        )


# CPUs of one CPU replica when cpus_per_replica is not set, so that a large node runs several
# replicas. NOTE: a chosen default, not a measured optimum.
DEFAULT_CPUS_PER_CPU_REPLICA = 4


@dataclass(frozen=True)
class ReplicaLayout:
    """Resources and device of the model replicas of one job.

    Attributes:
        count: replicas to start.
        num_cpus: CPUs reserved by each replica (Ray's ``num_cpus``).
        num_gpus: GPUs of each replica, 1 or 0 (Ray's ``num_gpus``).
        device: the torch device each replica embeds on (``cuda`` is the GPU Ray assigned to it).
        torch_threads: intra-op threads of torch in each CPU replica; None keeps torch's default.
    """

    count: int
    num_cpus: float
    num_gpus: int
    device: str
    torch_threads: int | None

    def describe(self) -> str:
        """Return a short description for logs, for example ``2 replicas x (1 GPU, 3 CPUs) on cuda``."""
        gpus = f"{self.num_gpus} GPU, " if self.num_gpus else ""
        return f"{self.count} replicas x ({gpus}{self.num_cpus:g} CPUs) on {self.device}"


def plan_replica_layout(
    spec: EmbedderSpec, options: RayEngineOptions, read_workers: int, node_resources: list[dict[str, float]]
) -> ReplicaLayout:
    """Decide how many replicas to start and the resources each one requests from Ray.

    Args:
        spec: the embedder spec; its ``device`` (``auto``, ``cpu``, ``cuda`` or ``mps``) picks
            GPU or CPU replicas.
        options: engine options (replica count and CPUs per replica, when given).
        read_workers: tile-reading threads per slide, reserved as CPUs next to each GPU replica.
        node_resources: the ``Resources`` of every alive node (as in :func:`ray.nodes`).

    Raises:
        ConfigError: the device cannot be used with Ray, or the cluster lacks the resources.
    """
    cpus = [float(node.get("CPU", 0.0)) for node in node_resources]
    gpus = sum(float(node.get("GPU", 0.0)) for node in node_resources)
    device = spec.device
    if device.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} cannot be used with --engine ray: Ray assigns one GPU to each replica; "
            "use --device cuda or auto"
        )

    if device == "cuda" or (device == "auto" and gpus >= 1):
        if gpus < 1:
            raise ConfigError("--device cuda was requested but the Ray cluster has no GPUs: use --device cpu or auto")
        num_cpus = options.cpus_per_replica or float(1 + read_workers)
        return ReplicaLayout(options.replicas or int(gpus), num_cpus, 1, "cuda", None)

    if not cpus or max(cpus) <= 0:
        raise ConfigError("the Ray cluster has no CPUs to run model replicas on")
    num_cpus = options.cpus_per_replica or float(min(DEFAULT_CPUS_PER_CPU_REPLICA, max(cpus)))
    fitting = sum(int(node_cpus // num_cpus) for node_cpus in cpus)
    if fitting < 1:
        raise ConfigError(f"no Ray node has {num_cpus:g} CPUs for one replica (nodes have {', '.join(f'{c:g}' for c in cpus)})")
    replica_device = "cpu" if device == "auto" else device
    return ReplicaLayout(options.replicas or fitting, num_cpus, 0, replica_device, max(1, int(num_cpus)))
