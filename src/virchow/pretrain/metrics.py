"""Running averages of the training metrics and the ``metrics.jsonl`` writer."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

_logger = logging.getLogger(__name__)


class WindowAverage:
    """Mean of each metric since the last :meth:`pop`."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, values: dict[str, float]) -> None:
        """Add one iteration's values."""
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def pop(self) -> dict[str, float]:
        """Return the means and start a new window."""
        means = {key: total / max(self._count, 1) for key, total in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class MetricsWriter:
    """Append one JSON object per line to ``metrics.jsonl``; a resumed run appends to the same file.

    Args:
        path: the JSON-lines file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def discard_after(self, iteration: int) -> None:
        """Remove records of iterations after ``iteration``, which a resumed run will write again."""
        if not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("iteration", 0)) <= iteration]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``; non-finite floats are written as null so that the line stays valid JSON."""
        clean = {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in record.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class ProgressLog:
    """Window averages of the per-iteration values, written as one record every few iterations.

    Args:
        writer: the ``metrics.jsonl`` writer, or None on ranks other than 0.
        total: iterations of the whole run, for the log line.
        images_per_iteration: images over all ranks per iteration.
        device: the training device; CUDA adds the peak allocated memory to each record.
    """

    def __init__(self, writer: MetricsWriter | None, total: int, images_per_iteration: int, device: torch.device) -> None:
        self.writer = writer
        self.total = total
        self.images_per_iteration = images_per_iteration
        self.device = device
        self.window = WindowAverage()
        self.started = time.perf_counter()
        self.iterations = 0

    def add(self, values: dict[str, float]) -> None:
        """Add one iteration's values, already averaged over ranks."""
        self.window.add(values)
        self.iterations += 1

    def write(self, iteration: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Close the window: write and return the record of ``iteration`` (1-based) with ``extra`` values."""
        seconds = (time.perf_counter() - self.started) / max(self.iterations, 1)
        record = {
            "iteration": iteration,
            **self.window.pop(),
            **extra,
            "seconds_per_iteration": seconds,
            "images_per_second": self.images_per_iteration / seconds,
        }
        if self.device.type == "cuda":
            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.writer is not None:
            self.writer.write(record)
            _logger.info(
                "iteration %d/%d loss %.4f lr %.3g teacher_cls_std %.4f (%.2f s/it)",
                iteration, self.total, record["loss"], record.get("lr", float("nan")),
                record.get("teacher_cls_std", float("nan")), seconds,
            )
        self.started, self.iterations = time.perf_counter(), 0
        return record
