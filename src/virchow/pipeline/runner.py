"""The run loop of ``embed-slides``: resume, locks, failure isolation, manifest and summary."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
from tqdm.auto import tqdm

from virchow.embed.embedder import Embedder
from virchow.errors import ConfigError, SlideError
from virchow.io.h5 import atomic_h5, remove_stale_temporaries, write_attrs
from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput, discover_slides
from virchow.pipeline.locks import SlideLock
from virchow.pipeline.manifest import SlideOutcome, read_manifest, upsert_outcome
from virchow.pipeline.slide import FEATURES_DIR, embed_planned_slide, feature_path, plan_slide, slide_attrs

_logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
LOCKS_DIR = ".locks"


@dataclass
class RunSummary:
    """Outcome of a run.

    Attributes:
        outcomes: one per slide this worker handled (done, failed, skipped or no_tissue).
        busy: slides another live worker was processing, left to it.
        unsupported: files skipped because no reader supports them.
        seconds: wall time of the run.
    """

    outcomes: list[SlideOutcome] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    unsupported: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.outcomes if o.reason != "already_done")

    @property
    def ok(self) -> bool:
        """True when no slide failed."""
        return not self.failed

    def describe(self) -> str:
        """Return a one-paragraph summary for logs."""
        embedded_seconds = sum(o.seconds for o in self.outcomes if o.status == "done" and o.reason != "already_done")
        rate = self.tiles / embedded_seconds if embedded_seconds else 0.0
        parts = [
            f"{self.count('done')} done",
            f"{sum(o.reason == 'already_done' for o in self.outcomes)} already done",
            f"{self.count('no_tissue')} without tissue",
            f"{len(self.failed)} failed",
        ]
        if self.busy:
            parts.append(f"{len(self.busy)} left to other workers")
        if self.unsupported:
            parts.append(f"{len(self.unsupported)} unsupported files skipped")
        return f"{', '.join(parts)}; {self.tiles} tiles embedded at {rate:.2f} tiles/s; {self.seconds:.1f} s in all"


def existing_output_is_current(path: Path, fingerprint: str) -> bool:
    """Return True when ``path`` is a complete feature file made with the same settings."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return handle.attrs.get("settings_hash") == fingerprint and "features" in handle and "coords" in handle
    except OSError:
        _logger.warning("%s is unreadable and will be recomputed", path)
        return False


def outcome_from_file(slide: SlideInput, path: Path) -> SlideOutcome:
    """Rebuild the manifest row of a finished slide from the attributes of its feature file."""
    with h5py.File(path, "r") as handle:
        attrs = handle.attrs
        tiles = int(attrs.get("n_tiles", len(handle["coords"])))
        seconds = float(attrs.get("seconds_total", 0.0))
        status = "no_tissue" if attrs.get("status") == "no_tissue" else "done"
        return SlideOutcome(
            slide.slide_id, str(slide.path), status, "ok" if status == "done" else "no_tissue",
            "recorded from the existing output", tiles=tiles, failed_tiles=int(attrs.get("n_failed_tiles", 0)),
            seconds=seconds, tiles_per_s=tiles / seconds if seconds else 0.0, output=str(path),
            settings=str(attrs.get("settings_hash", "")),
        )


def embed_slides(
    inputs: Sequence[str | Path] | Sequence[SlideInput],
    out_dir: str | Path,
    embedder: Embedder,
    config: SlideJobConfig | None = None,
    *,
    progress: bool = True,
) -> RunSummary:
    """Embed every slide of ``inputs`` into ``out_dir/features/<slide_id>.h5``.

    Args:
        inputs: slide files, folders, CSV manifests, or already discovered :class:`SlideInput`.
        out_dir: output folder, shared safely by several workers.
        embedder: the model to embed with.
        config: tiling and storage settings; defaults when None.
        progress: show progress bars.

    Returns:
        The run summary. A failing slide never stops the run: it is recorded with its reason.
    """
    started = time.perf_counter()
    config = config or SlideJobConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if inputs and all(isinstance(item, SlideInput) for item in inputs):
        slides, unsupported = list(inputs), []
    else:
        discovery = discover_slides(inputs)  # type: ignore[arg-type]
        slides, unsupported = discovery.slides, discovery.skipped
    if not slides:
        raise ConfigError(f"no slides found in {', '.join(map(str, inputs))}")

    features_dir = out_dir / FEATURES_DIR
    if features_dir.is_dir():
        for stale in remove_stale_temporaries(features_dir):
            _logger.warning("removed %s, left by an interrupted run", stale.name)
    metadata = embedder.metadata()
    fingerprint = config.fingerprint(metadata)
    manifest = out_dir / MANIFEST_NAME
    recorded = {row["slide_id"]: row["status"] for row in read_manifest(manifest)}
    summary = RunSummary(unsupported=list(unsupported))
    for path in unsupported:
        upsert_outcome(manifest, SlideOutcome(slide_id=path.name, path=str(path), status="skipped", reason="unsupported_format"))
    _logger.info("embedding %d slides into %s (settings %s)", len(slides), out_dir, fingerprint)

    with tqdm(total=len(slides), unit="slide", desc="slides", disable=not progress) as bar:
        for slide in slides:
            outcome = _run_one(slide, out_dir, embedder, config, fingerprint, progress=progress)
            if outcome is None:
                summary.busy.append(slide.slide_id)
            else:
                summary.outcomes.append(outcome)
                if outcome.reason != "already_done":
                    upsert_outcome(manifest, outcome)
                elif recorded.get(slide.slide_id) not in ("done", "no_tissue"):
                    # The previous run was killed after renaming the output but before recording it.
                    upsert_outcome(manifest, outcome_from_file(slide, Path(outcome.output)))
            bar.update(1)
            bar.set_postfix(failed=len(summary.failed))

    summary.seconds = time.perf_counter() - started
    _logger.info("%s", summary.describe())
    for outcome in summary.failed:
        _logger.error("failed: %s (%s): %s", outcome.slide_id, outcome.reason, outcome.message)
    return summary


def _run_one(
    slide: SlideInput, out_dir: Path, embedder: Embedder, config: SlideJobConfig, fingerprint: str, *, progress: bool
) -> SlideOutcome | None:
    out_path = feature_path(out_dir, slide.slide_id)
    lock_path = out_dir / LOCKS_DIR / f"{slide.slide_id}.lock"
    if existing_output_is_current(out_path, fingerprint):
        _logger.info("%s: already done with the same settings, skipped", slide.slide_id)
        SlideLock.clear_if_stale(lock_path)
        return SlideOutcome(slide.slide_id, str(slide.path), "skipped", "already_done", output=str(out_path), settings=fingerprint)

    lock = SlideLock.acquire(lock_path)
    if lock is None:
        _logger.info("%s: another worker is processing it", slide.slide_id)
        return None
    with lock:
        # Another worker may have finished the slide between the first check and the lock.
        if existing_output_is_current(out_path, fingerprint):
            return SlideOutcome(slide.slide_id, str(slide.path), "skipped", "already_done", output=str(out_path), settings=fingerprint)
        if out_path.exists():
            _logger.info("%s: existing output has other settings; recomputing", slide.slide_id)
        return process_slide(slide, out_dir, embedder, config, fingerprint, progress=progress)


def process_slide(
    slide: SlideInput,
    out_dir: Path,
    embedder: Embedder,
    config: SlideJobConfig,
    fingerprint: str,
    *,
    progress: bool = True,
    embed_guard: contextlib.AbstractContextManager[Any] | None = None,
) -> SlideOutcome:
    """Plan and embed one slide, turning every failure into a recorded outcome.

    ``embed_guard`` (a lock, for example) is held from the end of planning until the feature file
    is written, so a process that runs several slides at once plans one while another is embedded.
    """
    started = time.perf_counter()
    out_path = feature_path(out_dir, slide.slide_id)
    try:
        plan = plan_slide(slide, config, out_dir)
    except SlideError as exc:
        return _failure(slide, exc.reason, str(exc), started)
    except ConfigError as exc:
        return _failure(slide, "invalid_input", str(exc), started)
    except Exception as exc:  # isolate the slide: one bad file must not stop a batch of thousands
        _logger.error("%s: unexpected error while planning\n%s", slide.slide_id, traceback.format_exc())
        return _failure(slide, "internal_error", f"{type(exc).__name__}: {exc}", started)

    try:
        with embed_guard or contextlib.nullcontext():
            if len(plan.grid) == 0:
                return _write_empty(plan, config, embedder, out_path, fingerprint, started)
            return embed_planned_slide(plan, config, embedder, out_path, fingerprint, progress=progress)
    except SlideError as exc:
        return _failure(slide, exc.reason, str(exc), started)
    except Exception as exc:
        _logger.error("%s: unexpected error while embedding\n%s", slide.slide_id, traceback.format_exc())
        return _failure(slide, "internal_error", f"{type(exc).__name__}: {exc}", started)
    finally:
        plan.reader.close()


def _failure(slide: SlideInput, reason: str, message: str, started: float) -> SlideOutcome:
    _logger.error("%s failed (%s): %s", slide.slide_id, reason, message)
    return SlideOutcome(slide.slide_id, str(slide.path), "failed", reason, message, seconds=time.perf_counter() - started)


def _write_empty(plan, config: SlideJobConfig, embedder: Embedder, out_path: Path, fingerprint: str, started: float) -> SlideOutcome:
    """Write a zero-tile feature file, so that a rerun can tell that the slide is finished."""
    import numpy as np

    with atomic_h5(out_path) as handle:
        handle.create_dataset("features", shape=(0, *embedder.output_shape), dtype=np.float16 if config.float16 else np.float32)
        handle.create_dataset("coords", shape=(0, 2), dtype=np.int64)
        handle.create_dataset("failed_coords", shape=(0, 2), dtype=np.int64)
        write_attrs(handle, {**slide_attrs(plan, config, embedder.metadata(), fingerprint), "n_tiles": 0, "status": "no_tissue"})
    _logger.warning("%s: no tile has at least %.0f%% tissue; wrote an empty feature file", plan.slide.slide_id, 100 * config.min_tissue)
    return SlideOutcome(
        plan.slide.slide_id, str(plan.slide.path), "no_tissue", "no_tissue",
        f"no tile with tissue fraction >= {config.min_tissue}", seconds=time.perf_counter() - started,
        output=str(out_path), settings=fingerprint,
    )
