"""A run stopped and resumed continues exactly like an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from tests.pretrain.conftest import TILE_DATA, TINY
from virchow.cli.main import main
from virchow.pretrain.checkpoint import load_checkpoint
from virchow.pretrain.metrics import read_metrics

# Drop path is on, so the torch random state must survive the restart too, and the prototypes
# unfreeze after the first checkpoint, so the schedules must continue exactly.
SETTINGS = [
    *TINY,
    *TILE_DATA,
    "model.drop_path_rate=0.2",
    "train.iterations=8",
    "train.checkpoint_every=3",
    "optim.freeze_last_layer_iterations=2",
    "regularizer.kind=kde",
]


def run(output, *extra: str) -> int:
    return main(["-q", "pretrain", *SETTINGS, f"train.output_dir={output}", *extra])


def losses(output) -> list[tuple[int, float, float]]:
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(output / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(output) == 0
    finally:
        torch.set_num_threads(previous)
    return output


def test_stop_and_resume_matches_uninterrupted(uninterrupted, tmp_path, one_thread):
    # Stop after 5 iterations (between checkpoints), then resume with DataLoader workers, which
    # must not change the data.
    assert run(tmp_path, "train.stop_after=5") == 0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 5
    assert run(tmp_path, "data.num_workers=2") == 0

    assert losses(tmp_path) == losses(uninterrupted)
    straight = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key, value in straight["teacher"].items():
        assert torch.equal(value, resumed["teacher"][key]), key
    assert straight["samples_seen"] == resumed["samples_seen"] == 8 * 4


def test_resume_from_older_checkpoint_rewrites_metrics(uninterrupted, tmp_path, one_thread):
    # A crash after iteration 7 leaves metrics past the last checkpoint (iteration 6); the resumed
    # run replaces them instead of appending duplicates.
    assert run(tmp_path, "train.stop_after=6") == 0
    straight_lines = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(straight_lines[:7]) + "\n")
    assert run(tmp_path) == 0
    assert losses(tmp_path) == losses(uninterrupted)


def test_finished_run_is_not_repeated(uninterrupted, one_thread):
    before = (uninterrupted / "metrics.jsonl").read_text()
    assert run(uninterrupted) == 0
    assert (uninterrupted / "metrics.jsonl").read_text() == before
    assert (uninterrupted / "config.1.yaml").is_file()
