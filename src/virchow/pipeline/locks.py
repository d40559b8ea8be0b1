"""Per-slide lock files, so that several workers can share one output folder.

A lock is created with ``O_CREAT | O_EXCL``, which is atomic on local file systems and on NFSv3+,
so exactly one worker wins a slide. The file contains the owner's host, pid and start time. A lock
whose owner is a dead process on this host is stale and is taken over. A lock from another host
is stale when its heartbeat (the file's modification time, refreshed while the slide runs) is
older than ``stale_after`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 600.0
_HEARTBEAT_EVERY = 30.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlideLock:
    """An exclusive claim on one slide, held while it is processed.

    Use :meth:`acquire`; it returns None when another live worker has the slide.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def acquire(cls, path: Path, *, stale_after: float = DEFAULT_STALE_AFTER) -> SlideLock | None:
        """Create the lock file, recovering a stale one; return None if a live worker holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not cls._remove_if_stale(path, stale_after):
                    return None
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, handle)
            lock = cls(path)
            lock._start_heartbeat()
            return lock
        return None

    @classmethod
    def clear_if_stale(cls, path: Path, *, stale_after: float = DEFAULT_STALE_AFTER) -> None:
        """Delete the lock at ``path`` if its owner is gone (a worker killed after finishing its output)."""
        if path.exists():
            cls._remove_if_stale(path, stale_after)

    @staticmethod
    def _remove_if_stale(path: Path, stale_after: float) -> bool:
        try:
            owner = json.loads(path.read_text() or "{}")
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except (OSError, json.JSONDecodeError):
            owner, age = {}, time.time() - path.stat().st_mtime if path.exists() else 0.0
        same_host = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if same_host and isinstance(pid, int) and not _pid_alive(pid):
            reason = f"process {pid} on this host is gone"
        elif age > stale_after:
            reason = f"no heartbeat for {age:.0f} s"
        else:
            return False
        _logger.warning("recovering stale lock %s (%s)", path.name, reason)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(_HEARTBEAT_EVERY):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._heartbeat = threading.Thread(target=beat, name=f"heartbeat-{self.path.name}", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file."""
        self._stop.set()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
