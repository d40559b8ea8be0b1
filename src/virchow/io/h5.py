"""Atomic HDF5 output: write to a temporary file in the same folder, flush, fsync, rename.

A reader never sees a half-written file under the final name, so a crash leaves either the
previous complete file or no file, never one that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

TMP_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """Return the hidden temporary name used while ``path`` is written (unique per host and pid)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file that replaces ``path`` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with h5py.File(tmp, "w") as handle:
            yield handle
            handle.flush()
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def to_attr(value: Any) -> Any:
    """Convert a Python value to something HDF5 stores as an attribute.

    None becomes an empty string, mappings and nested lists become JSON text, paths become strings.
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return value
    if isinstance(value, (str, Path)):
        return str(value)  # also unwraps str subclasses such as torch.__version__
    if isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, Mapping)) for v in value)):
        return json.dumps(value, default=str)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
        return json.dumps(list(value), default=str)
    return str(value)


def write_attrs(target: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Write every entry of ``attrs`` through :func:`to_attr`."""
    for key, value in attrs.items():
        target.attrs[key] = to_attr(value)


def read_attrs(target: h5py.HLObject) -> dict[str, Any]:
    """Read attributes back as Python values (bytes decoded, numpy scalars unwrapped)."""
    result: dict[str, Any] = {}
    for key, value in target.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        result[key] = value
    return result


STRING_DTYPE = h5py.string_dtype(encoding="utf-8")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by dead processes of this host; return them.

    Temporary files of live processes, and of other hosts (which this host cannot check), stay.
    """
    removed: list[Path] = []
    host = socket.gethostname()
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        except PermissionError:
            continue
    return removed
