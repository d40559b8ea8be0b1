"""Files of the run directory that describe a run: ``run_config.json``, ``split.csv`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch

from virchow import __version__
from virchow.finetune.config import FinetuneConfig
from virchow.finetune.data import TileSplit
from virchow.models import WeightsProvenance


class RunRecords:
    """Writer of the run description and the metrics log, active on rank 0 only.

    Args:
        out_dir: the run directory.
        enabled: False on ranks other than 0, which makes every method a no-op.
    """

    def __init__(self, out_dir: Path, *, enabled: bool) -> None:
        self.out_dir = out_dir
        self.metrics_path = out_dir / "metrics.jsonl"
        self.enabled = enabled

    def write_run(self, config: FinetuneConfig, split: TileSplit, base_weights: WeightsProvenance, **details: Any) -> None:
        """Write ``run_config.json`` (settings, data, weights, versions, git revision) and ``split.csv``."""
        if not self.enabled:
            return
        record = {
            "config": config.to_dict(),
            **details,
            "classes": split.classes,
            "split": {"method": split.method, "train": len(split.train), "val": len(split.val)},
            "base_weights": base_weights.to_attrs(),
            "virchow_version": __version__,
            "torch_version": torch.__version__,
            "git_revision": git_revision(),
        }
        (self.out_dir / "run_config.json").write_text(json.dumps(record, indent=2) + "\n")
        split.write_csv(self.out_dir / "split.csv")

    def append(self, record: dict[str, Any]) -> None:
        """Append one JSON record to ``metrics.jsonl``."""
        if self.enabled:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs after ``epoch``, written by a run that died before its next checkpoint."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))


def git_revision() -> str | None:
    """Return the commit of the source tree this package runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None
