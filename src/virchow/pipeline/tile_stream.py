"""Read tiles in background threads while the model runs.

Tiles are grouped into regions of a few tiles per side. A pool of threads reads each region once
and cuts it into tiles. Each thread has its own slide handle, because not every backend is
thread-safe.
At most ``2 x workers`` regions are in flight, so memory stays bounded whatever the slide size.
A region that fails to decode is re-read tile by tile. A tile that fails twice is excluded and
reported, never replaced by a blank tile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from virchow.errors import TileReadError
from virchow.wsi.readers import SlideReader
from virchow.wsi.resolution import ResolutionPlan
from virchow.wsi.tiling import group_tiles_into_regions, read_tile, read_tiles_from_region

_logger = logging.getLogger(__name__)


@dataclass
class ReadStats:
    """Counters of one tile stream.

    Attributes:
        failed: indices (into the coordinates) of tiles that could not be read after a retry.
        failure_messages: the error of each failed tile, in the order of ``failed``.
        wait_seconds: time the consumer spent waiting for tiles (I/O not hidden behind compute).
        regions: regions read.
    """

    failed: list[int] = field(default_factory=list)
    failure_messages: list[str] = field(default_factory=list)
    wait_seconds: float = 0.0
    regions: int = 0


class TileStream:
    """Iterate over (indices, tiles) of a slide, read ahead by worker threads.

    Args:
        open_reader: callable that opens a new handle on the slide (one per thread).
        reader: an open handle, used for grouping tiles into regions.
        plan: resolution plan of the slide.
        coords: (N, 2) level-0 top-left (x, y) of the tiles.
        workers: reading threads.
        region_tiles: tiles per side of one region read.
    """

    def __init__(
        self,
        open_reader: Callable[[], SlideReader],
        reader: SlideReader,
        plan: ResolutionPlan,
        coords: np.ndarray,
        *,
        workers: int = 2,
        region_tiles: int = 4,
    ) -> None:
        self.plan = plan
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.workers = max(1, workers)
        self.groups = group_tiles_into_regions(reader, plan, self.coords, tiles_per_side=region_tiles)
        self.stats = ReadStats()
        self._open_reader = open_reader
        self._local = threading.local()
        self._readers: list[SlideReader] = []
        self._readers_lock = threading.Lock()

    def _thread_reader(self) -> SlideReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._open_reader()
            self._local.reader = reader
            with self._readers_lock:
                self._readers.append(reader)
        return reader

    def _read_group(self, region_xy: tuple[int, int], indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        reader = self._thread_reader()
        try:
            tiles = read_tiles_from_region(reader, self.plan, region_xy, self.coords[indices])
            return indices, tiles, []
        except TileReadError as exc:
            _logger.debug("region at %s failed (%s); reading its %d tiles one by one", region_xy, exc, len(indices))

        good_indices: list[int] = []
        good_tiles: list[np.ndarray] = []
        failures: list[tuple[int, str]] = []
        for index in indices:
            xy = tuple(int(v) for v in self.coords[index])
            for attempt in (1, 2):
                try:
                    good_tiles.append(read_tile(reader, self.plan, xy))
                    good_indices.append(int(index))
                    break
                except TileReadError as exc:
                    if attempt == 2:
                        failures.append((int(index), str(exc)))
        shape = (0, self.plan.tile_size, self.plan.tile_size, 3)
        tiles = np.stack(good_tiles) if good_tiles else np.empty(shape, dtype=np.uint8)
        return np.asarray(good_indices, dtype=np.int64), tiles, failures

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pending: set[Future] = set()
        groups = iter(self.groups)
        max_pending = 2 * self.workers
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="tile-reader") as pool:
                while True:
                    while len(pending) < max_pending:
                        group = next(groups, None)
                        if group is None:
                            break
                        pending.add(pool.submit(self._read_group, *group))
                    if not pending:
                        return
                    started = time.perf_counter()
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    self.stats.wait_seconds += time.perf_counter() - started
                    for future in done:
                        indices, tiles, failures = future.result()
                        self.stats.regions += 1
                        for index, message in failures:
                            _logger.warning("tile at level-0 %s could not be read twice; excluded: %s", tuple(self.coords[index]), message)
                            self.stats.failed.append(index)
                            self.stats.failure_messages.append(message)
                        if len(indices):
                            yield indices, tiles
        finally:
            for future in pending:
                future.cancel()
            with self._readers_lock:
                for reader in self._readers:
                    reader.close()
                self._readers.clear()
