"""Two gloo processes under torchrun train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virchow.finetune import run_finetune

from .conftest import make_config, read_records

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to the Python interpreter")
def test_torchrun_matches_single_process(separable_tiles: Path, tmp_path: Path) -> None:
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    run_finetune(make_config(separable_tiles, single_dir, mode="full", lr=1e-3, epochs=2, export=False))

    command = [
        str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "virchow", "finetune", str(separable_tiles), "--out", str(multi_dir),
        "--model", "virchow-test", "--weights", "random:0", "--mode", "full", "--lr", "1e-3", "--epochs", "2",
        "--batch-size", "4", "--val-fraction", "0.25", "--patience", "0", "--warmup-epochs", "0.5",
        "--device", "cpu", "--precision", "fp32", "--workers", "0", "--no-export", "--no-progress",
    ]
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]

    record = json.loads((multi_dir / "run_config.json").read_text())
    assert record["world_size"] == 2
    single_steps, multi_steps = read_records(single_dir, "step"), read_records(multi_dir, "step")
    assert len(multi_steps) == len(single_steps) == 6
    for one, two in zip(single_steps, multi_steps, strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), two["step"]
        assert two["lr"] == pytest.approx(one["lr"])
    single_epochs, multi_epochs = read_records(single_dir, "epoch"), read_records(multi_dir, "epoch")
    for one, two in zip(single_epochs, multi_epochs, strict=True):
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
        assert two["val_accuracy"] == one["val_accuracy"]
