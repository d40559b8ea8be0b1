"""The run manifest: one CSV row per slide with its latest outcome.

Each update rewrites the manifest to a temporary file and renames it over the old one while
holding an exclusive ``flock`` on a lock file next to it. Several workers can therefore share one
manifest, and a crash leaves either the old or the new version, never a torn one.
NOTE: flock is advisory and unreliable on some network file systems, so workers on different
machines sharing an NFS folder may lose a manifest row (the feature files are unaffected).
"""

from __future__ import annotations

import csv
import fcntl
import os
import socket
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

Status = Literal["done", "failed", "skipped", "no_tissue"]


@dataclass
class SlideOutcome:
    """Outcome of one slide in a run.

    Attributes:
        slide_id: output name of the slide.
        path: the slide file.
        status: ``done``, ``failed``, ``skipped`` or ``no_tissue``.
        reason: short code: ``ok``, ``already_done``, ``no_mpp``, ``unreadable``, ... .
        message: the full error or note.
        tiles: tiles embedded and stored.
        failed_tiles: tiles excluded because they could not be read.
        seconds: wall time of the slide.
        tiles_per_s: embedded tiles per second of wall time.
        output: the feature file, empty when none was written.
        settings: fingerprint of the settings the output was made with.
    """

    slide_id: str
    path: str
    status: Status
    reason: str = "ok"
    message: str = ""
    tiles: int = 0
    failed_tiles: int = 0
    seconds: float = 0.0
    tiles_per_s: float = 0.0
    output: str = ""
    settings: str = ""
    host: str = ""
    pid: int = 0
    finished: str = ""

    @property
    def ok(self) -> bool:
        """True unless the slide failed."""
        return self.status != "failed"


COLUMNS = [f.name for f in fields(SlideOutcome)]


def upsert_outcome(manifest: Path, outcome: SlideOutcome) -> None:
    """Store ``outcome`` as the row of its slide, replacing an older row of the same slide id."""
    outcome.host = outcome.host or socket.gethostname()
    outcome.pid = outcome.pid or os.getpid()
    outcome.finished = outcome.finished or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    outcome.seconds = round(outcome.seconds, 3)
    outcome.tiles_per_s = round(outcome.tiles_per_s, 3)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = manifest.with_name(f".{manifest.name}.lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            rows = {row["slide_id"]: row for row in read_manifest(manifest)}
            rows[outcome.slide_id] = {key: str(value) for key, value in asdict(outcome).items()}
            tmp = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
            with tmp.open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows.values())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(manifest: Path) -> list[dict[str, str]]:
    """Return every row of ``manifest`` (empty when it does not exist)."""
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
