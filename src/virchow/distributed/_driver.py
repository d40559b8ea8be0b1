"""The driver loop of the Ray engine: hand slides to replicas, retry after deaths, record outcomes.

Ray places, starts and restarts the replica actors. This loop only decides which slide goes to
which ready replica, with the same resume checks, locks and manifest rows as the local engine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError
from tqdm.auto import tqdm

from virchow.distributed.options import EmbedderSpec, RayEngineOptions, ReplicaLayout
from virchow.distributed.replica import EmbedReplica, ReplicaInfo
from virchow.distributed.summary import RaySummary, ReplicaStats
from virchow.errors import VirchowError
from virchow.pipeline.config import SlideJobConfig
from virchow.pipeline.inputs import SlideInput
from virchow.pipeline.locks import SlideLock
from virchow.pipeline.manifest import SlideOutcome, read_manifest, upsert_outcome
from virchow.pipeline.runner import LOCKS_DIR, MANIFEST_NAME, existing_output_is_current, outcome_from_file
from virchow.pipeline.slide import feature_path

_logger = logging.getLogger(__name__)

WORKER_DIED = "worker_died"
NO_REPLICAS = "no_replicas"
# Errors that mean the replica process (or its node) died while it held the call.
_WORKER_LOST = (RayActorError, WorkerCrashedError)
# Seconds between readiness checks of a replica that Ray is restarting.
_RESTART_POLL_S = 0.5


class ReplicaStartError(VirchowError):
    """No model replica could start, or one failed while loading the model."""


@dataclass
class _ReplicaState:
    """Driver-side state of one replica actor."""

    handle: ray.actor.ActorHandle
    stats: ReplicaStats
    state: str = "starting"  # starting, ready, recovering (restarting after a death) or dead
    in_flight: dict[ray.ObjectRef, tuple[SlideInput, int]] = field(default_factory=dict)  # slide, generation
    generation: int = 0  # incremented at each death, so that calls of a dead process count it once
    exclusive: bool = False  # running a retried slide alone, so that a new death is attributable to it
    busy_since: float = 0.0
    unavailable_since: float = 0.0


class JobDriver:
    """Hand slides to replicas and record their outcomes; one instance per job."""

    def __init__(
        self,
        slides: list[SlideInput],
        out_dir: Path,
        spec: EmbedderSpec,
        config: SlideJobConfig,
        options: RayEngineOptions,
        layout: ReplicaLayout,
        started: float,
    ) -> None:
        self.slides = slides
        self.out_dir = out_dir
        self.spec = spec
        self.config = config
        self.options = options
        self.layout = layout
        self.started = started
        self.manifest = out_dir / MANIFEST_NAME
        self.recorded = {row["slide_id"]: row["status"] for row in read_manifest(self.manifest)}
        self.summary = RaySummary(layout=layout)
        self.fingerprint: str | None = None
        self.fresh: list[SlideInput] = list(reversed(slides))  # popped from the end, in input order
        self.retries: list[SlideInput] = []
        self.attempts: dict[str, int] = {}
        self.first_dispatch: dict[str, float] = {}
        self.locks: dict[str, SlideLock] = {}
        self.replicas: list[_ReplicaState] = []
        self.describing: dict[ray.ObjectRef, _ReplicaState] = {}
        self.describe_later: dict[int, float] = {}  # replica index -> when to ask a restarting replica again
        self.bar: tqdm | None = None

    # --- the main loop ---------------------------------------------------------------------

    def run(self, *, progress: bool) -> RaySummary:
        self._start_replicas()
        try:
            with tqdm(total=len(self.slides), unit="slide", desc="slides", disable=not progress) as self.bar:
                self._wait_for_first_replica()
                while self.fresh or self.retries or self._slides_in_flight():
                    self._dispatch()
                    if self._no_replica_left():
                        self._fail_remaining()
                        break
                    self._wait_and_handle([*self.describing, *(ref for r in self.replicas for ref in r.in_flight)])
        finally:
            for lock in self.locks.values():
                lock.release()
            self.locks.clear()
            for replica in self.replicas:
                ray.kill(replica.handle)
        self.summary.replicas = [replica.stats for replica in self.replicas]
        return self.summary

    def _start_replicas(self) -> None:
        actor_class = ray.remote(EmbedReplica).options(
            num_cpus=self.layout.num_cpus,
            num_gpus=self.layout.num_gpus,
            max_restarts=self.options.max_restarts,
            max_task_retries=0,  # the driver retries slides itself, counting attempts per slide
            max_concurrency=self.options.slides_per_replica + 1,  # one more for describe()
            scheduling_strategy="SPREAD",
        )
        log_level = logging.getLogger("virchow").getEffectiveLevel()
        for index in range(self.layout.count):
            handle = actor_class.remote(
                self.spec, str(self.out_dir), self.config, log_level=log_level, torch_threads=self.layout.torch_threads
            )
            replica = _ReplicaState(handle, ReplicaStats(index), unavailable_since=time.monotonic())
            self.replicas.append(replica)
            self.describing[handle.describe.remote()] = replica

    def _wait_for_first_replica(self) -> None:
        deadline = time.monotonic() + self.options.start_timeout_s
        while self.fingerprint is None:
            if not self.describing and not self.describe_later:
                raise ReplicaStartError("every model replica died while starting; see the worker errors above")
            if time.monotonic() > deadline:
                raise ReplicaStartError(
                    f"no model replica started within {self.options.start_timeout_s:.0f} s; each requests "
                    f"{self.layout.describe()}: check that the cluster's nodes have these resources (`ray status`)"
                )
            self._wait_and_handle(list(self.describing))
        self.summary.startup_seconds = time.perf_counter() - self.started

    def _wait_and_handle(self, pending: list[ray.ObjectRef]) -> None:
        """Handle the results that arrive within a second, after asking restarted replicas again."""
        now = time.monotonic()
        for index, due in list(self.describe_later.items()):
            if due <= now:
                del self.describe_later[index]
                replica = self.replicas[index]
                ref = replica.handle.describe.remote()
                self.describing[ref] = replica
                pending.append(ref)
        if not pending:  # only replicas that Ray is still restarting
            time.sleep(_RESTART_POLL_S)
            return
        ready, _ = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in ready:
            self._handle(ref)

    def _slides_in_flight(self) -> bool:
        return any(replica.in_flight for replica in self.replicas)

    def _no_replica_left(self) -> bool:
        """True when work remains but no replica can take it, now or within the start timeout."""
        if self._slides_in_flight() or any(replica.state == "ready" for replica in self.replicas):
            return False
        waiting = [r for r in self.replicas if r.state in ("starting", "recovering")]
        return not waiting or time.monotonic() - min(r.unavailable_since for r in waiting) > self.options.start_timeout_s

    # --- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        ready = [replica for replica in self.replicas if replica.state == "ready"]
        # A retried slide runs alone on a replica. While one waits, fresh slides are held back so
        # that a busy replica drains instead of being refilled forever.
        for replica in ready:
            if self.retries and not replica.in_flight:
                self._submit(replica, self.retries.pop(0), exclusive=True)
        if self.retries:
            return
        # Fill the replicas level by level, so that slides spread over replicas before queueing.
        for level in range(1, self.options.slides_per_replica + 1):
            for replica in ready:
                if replica.exclusive or len(replica.in_flight) >= level:
                    continue
                slide = self._claim_next()
                if slide is None:
                    return
                self._submit(replica, slide, exclusive=False)

    def _claim_next(self) -> SlideInput | None:
        """Pop the next fresh slide that needs embedding and take its lock, as the local engine does."""
        assert self.fingerprint is not None
        while self.fresh:
            slide = self.fresh.pop()
            out_path = feature_path(self.out_dir, slide.slide_id)
            lock_path = self.out_dir / LOCKS_DIR / f"{slide.slide_id}.lock"
            if existing_output_is_current(out_path, self.fingerprint):
                _logger.info("%s: already done with the same settings, skipped", slide.slide_id)
                SlideLock.clear_if_stale(lock_path)
                self._record_already_done(slide, out_path)
                continue
            lock = SlideLock.acquire(lock_path)
            if lock is None:
                _logger.info("%s: another worker is processing it", slide.slide_id)
                self.summary.busy.append(slide.slide_id)
                self._advance()
                continue
            # Another worker may have finished the slide between the first check and the lock.
            if existing_output_is_current(out_path, self.fingerprint):
                lock.release()
                self._record_already_done(slide, out_path)
                continue
            if out_path.exists():
                _logger.info("%s: existing output has other settings; recomputing", slide.slide_id)
            self.locks[slide.slide_id] = lock
            return slide
        return None

    def _submit(self, replica: _ReplicaState, slide: SlideInput, *, exclusive: bool) -> None:
        assert self.fingerprint is not None
        if not replica.in_flight:
            replica.busy_since = time.monotonic()
        replica.exclusive = exclusive
        self.first_dispatch.setdefault(slide.slide_id, time.perf_counter())
        ref = replica.handle.embed_slide.remote(slide, self.fingerprint)
        replica.in_flight[ref] = (slide, replica.generation)
        _logger.debug("%s: sent to replica %d", slide.slide_id, replica.stats.index)

    # --- results -----------------------------------------------------------------------------

    def _handle(self, ref: ray.ObjectRef) -> None:
        if ref in self.describing:
            self._handle_describe(ref, self.describing.pop(ref))
            return
        replica = next(r for r in self.replicas if ref in r.in_flight)
        slide, generation = replica.in_flight.pop(ref)
        if not replica.in_flight:
            replica.stats.busy_seconds += time.monotonic() - replica.busy_since
            replica.exclusive = False
        try:
            outcome: SlideOutcome = ray.get(ref)
        except _WORKER_LOST as exc:
            if generation == replica.generation:
                self._replica_died(replica, exc)
            self._retry_or_fail(slide, replica, exc)
            return
        except RayTaskError as exc:  # an error outside process_slide's own handling
            _logger.error("%s failed (internal_error) on replica %d: %s", slide.slide_id, replica.stats.index, exc)
            outcome = SlideOutcome(
                slide.slide_id, str(slide.path), "failed", "internal_error", f"{type(exc).__name__}: {exc}",
                seconds=time.perf_counter() - self.first_dispatch[slide.slide_id],
            )
        replica.stats.slides += 1
        replica.stats.tiles += outcome.tiles
        self._record(slide, outcome)

    def _handle_describe(self, ref: ray.ObjectRef, replica: _ReplicaState) -> None:
        try:
            info: ReplicaInfo = ray.get(ref)
        except ActorUnavailableError:
            # Ray is still restarting the process: ask again shortly, without counting a new death.
            self.describe_later[replica.stats.index] = time.monotonic() + _RESTART_POLL_S
            return
        except _WORKER_LOST as exc:
            if isinstance(exc, RayActorError) and exc.actor_init_failed:
                raise ReplicaStartError(f"model replica {replica.stats.index} failed to load the model: {exc}") from exc
            self._replica_died(replica, exc)
            return
        fingerprint = self.config.fingerprint(info.metadata)
        if self.fingerprint is None:
            self.fingerprint = fingerprint
        elif fingerprint != self.fingerprint:
            raise ReplicaStartError(
                f"replica {replica.stats.index} on {info.host} embeds with other settings than the first replica "
                f"(precision {info.metadata.get('precision')}, device {info.device}): set --precision explicitly"
            )
        restarted = replica.stats.info is not None
        replica.stats.info = info
        replica.state = "ready"
        _logger.info(
            "replica %d %s on %s (pid %d, %s, %d torch threads)", replica.stats.index,
            "restarted" if restarted else "ready", info.host, info.pid, info.device, info.torch_threads,
        )

    def _replica_died(self, replica: _ReplicaState, exc: BaseException) -> None:
        """Count a death of the replica's process and ask the restarted process to describe itself."""
        if replica.state == "dead":
            return
        replica.generation += 1
        replica.stats.deaths += 1
        replica.unavailable_since = time.monotonic()
        where = f"pid {replica.stats.info.pid} on {replica.stats.info.host}" if replica.stats.info else "while starting"
        if replica.stats.deaths > self.options.max_restarts:
            replica.state = "dead"
            _logger.error("replica %d (%s) died and has no restarts left: %s", replica.stats.index, where, _first_line(exc))
            return
        replica.state = "recovering"
        _logger.warning(
            "replica %d (%s) died; Ray restarts it (restart %d of at most %d): %s", replica.stats.index, where,
            replica.stats.deaths, self.options.max_restarts, _first_line(exc),
        )
        self.describe_later[replica.stats.index] = time.monotonic()

    def _retry_or_fail(self, slide: SlideInput, replica: _ReplicaState, exc: BaseException) -> None:
        attempts = self.attempts.get(slide.slide_id, 0) + 1
        self.attempts[slide.slide_id] = attempts
        out_path = feature_path(self.out_dir, slide.slide_id)
        assert self.fingerprint is not None
        if existing_output_is_current(out_path, self.fingerprint):
            # The process died after renaming the finished file, before returning the outcome.
            _logger.info("%s: replica %d died after writing the feature file; recording it", slide.slide_id,
                         replica.stats.index)
            self._record(slide, outcome_from_file(slide, out_path))
            return
        if attempts <= self.options.max_slide_retries:
            _logger.warning(
                "%s: replica %d died while embedding it; retrying (attempt %d of %d)", slide.slide_id,
                replica.stats.index, attempts + 1, self.options.max_slide_retries + 1,
            )
            self.retries.append(slide)
            return
        message = (
            f"the worker process died on each of {attempts} attempts (last on replica {replica.stats.index}): "
            f"{_first_line(exc)}"
        )
        seconds = time.perf_counter() - self.first_dispatch[slide.slide_id]
        _logger.error("%s failed (%s): %s", slide.slide_id, WORKER_DIED, message)
        self._record(slide, SlideOutcome(slide.slide_id, str(slide.path), "failed", WORKER_DIED, message, seconds=seconds))

    def _fail_remaining(self) -> None:
        """Record every slide that no replica can take any more as failed."""
        message = (
            f"no model replica is left: each died more than max_restarts ({self.options.max_restarts}) times or "
            f"could not be placed within start_timeout_s ({self.options.start_timeout_s:.0f} s)"
        )
        _logger.error("%s; %d slides left undone", message, len(self.fresh) + len(self.retries))
        for slide in [*self.retries, *reversed(self.fresh)]:
            self._record(slide, SlideOutcome(slide.slide_id, str(slide.path), "failed", NO_REPLICAS, message))
        self.fresh.clear()
        self.retries.clear()

    # --- bookkeeping ---------------------------------------------------------------------------

    def _record(self, slide: SlideInput, outcome: SlideOutcome) -> None:
        lock = self.locks.pop(slide.slide_id, None)
        self.summary.outcomes.append(outcome)
        upsert_outcome(self.manifest, outcome)
        if lock is not None:
            lock.release()
        # Failures are logged where they happen: by the replica, or by the driver for worker deaths.
        if outcome.status != "failed":
            _logger.info(
                "%s: %s, %d tiles in %.1f s on %s pid %d", slide.slide_id, outcome.status, outcome.tiles,
                outcome.seconds, outcome.host, outcome.pid,
            )
        self._advance()

    def _record_already_done(self, slide: SlideInput, out_path: Path) -> None:
        outcome = SlideOutcome(
            slide.slide_id, str(slide.path), "skipped", "already_done", output=str(out_path), settings=self.fingerprint or ""
        )
        self.summary.outcomes.append(outcome)
        if self.recorded.get(slide.slide_id) not in ("done", "no_tissue"):
            # The previous run was killed after renaming the output but before recording it.
            upsert_outcome(self.manifest, outcome_from_file(slide, out_path))
        self._advance()

    def _advance(self) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        elapsed = time.perf_counter() - self.started - self.summary.startup_seconds
        rate = self.summary.tiles / elapsed if elapsed > 0 else 0.0
        self.bar.set_postfix(failed=len(self.summary.failed), tiles_per_s=f"{rate:.2f}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
