"""Summary of a Ray job: the local engine's summary plus the throughput of each model replica."""

from __future__ import annotations

from dataclasses import dataclass, field

from virchow.distributed.options import ReplicaLayout
from virchow.distributed.replica import ReplicaInfo
from virchow.pipeline.runner import RunSummary


@dataclass
class ReplicaStats:
    """Work done by one replica during a job.

    Attributes:
        index: position of the replica in the job.
        info: where its current process runs, None until it has started.
        slides: slides it finished (done, no tissue or failed by the slide itself).
        tiles: tiles it embedded.
        busy_seconds: wall time with at least one slide in flight on it, seen from the driver.
        deaths: times its process died while the driver was waiting on it.
    """

    index: int
    info: ReplicaInfo | None = None
    slides: int = 0
    tiles: int = 0
    busy_seconds: float = 0.0
    deaths: int = 0

    def describe(self) -> str:
        """Return one log line with this replica's throughput."""
        where = f"{self.info.host} pid {self.info.pid}, {self.info.device}" if self.info else "never started"
        rate = self.tiles / self.busy_seconds if self.busy_seconds else 0.0
        return (
            f"replica {self.index} ({where}): {self.slides} slides, {self.tiles} tiles, "
            f"{rate:.2f} tiles/s while busy, {self.deaths} process deaths"
        )


@dataclass
class RaySummary(RunSummary):
    """Outcome of a Ray job: the local engine's summary plus per-replica numbers.

    Attributes:
        layout: the replicas' resources.
        replicas: throughput and deaths of each replica.
        startup_seconds: from the start of the job until the first replica had loaded its model.
    """

    layout: ReplicaLayout | None = None
    replicas: list[ReplicaStats] = field(default_factory=list)
    startup_seconds: float = 0.0

    @property
    def tiles_per_second(self) -> float:
        """Tiles embedded per second of wall time after the first replica started."""
        embedding_seconds = self.seconds - self.startup_seconds
        return self.tiles / embedding_seconds if embedding_seconds > 0 else 0.0

    def describe_cluster(self) -> list[str]:
        """Return log lines with the overall and per-replica throughput."""
        layout = self.layout.describe() if self.layout else "no replicas"
        lines = [
            f"ray: {layout}; {self.tiles} tiles at {self.tiles_per_second:.2f} tiles/s overall "
            f"({self.startup_seconds:.1f} s until the first replica was ready, {self.seconds:.1f} s in all)"
        ]
        lines.extend(stats.describe() for stats in self.replicas)
        return lines
