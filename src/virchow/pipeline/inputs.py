"""Find the slides of a run: files, folders searched recursively, or a CSV manifest."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virchow.errors import ConfigError
from virchow.wsi.readers import SUPPORTED_EXTENSIONS, slide_extension

_logger = logging.getLogger(__name__)

# Files that sit next to slides and are never slides themselves.
_IGNORED_SUFFIXES = {".csv", ".txt", ".json", ".geojson", ".h5", ".md", ".xml", ".ini", ".dat", ".log", ".tmp"}
_SLIDE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class SlideInput:
    """One slide to process.

    Attributes:
        path: the slide file (for DICOM, the largest ``.dcm`` file of the series folder).
        slide_id: output name, unique within the run; file stem by default.
        mpp: level-0 pixel size override in um/px, or None to read it from the metadata.
        mask: a per-slide tissue mask (GeoJSON or PNG), or None.
    """

    path: Path
    slide_id: str
    mpp: float | None = None
    mask: Path | None = None


@dataclass
class Discovery:
    """Result of input discovery: the slides, and files skipped because no reader supports them."""

    slides: list[SlideInput]
    skipped: list[Path]


def default_slide_id(path: Path) -> str:
    """Return the output name of a slide: its file name without the slide extension."""
    if path.suffix.lower() == ".dcm":
        return _safe_id(path.parent.name)
    extension = slide_extension(path)
    name = path.name[: len(path.name) - len(extension)] if extension else path.stem
    return _safe_id(name)


def _safe_id(name: str) -> str:
    cleaned = _SLIDE_ID.sub("_", name).strip("._")
    return cleaned or "slide"


def discover_slides(inputs: Sequence[str | Path]) -> Discovery:
    """Turn command-line inputs into slides.

    Args:
        inputs: slide files, folders (searched recursively by extension), or CSV manifests with a
            ``path`` column and optional ``slide_id``, ``mpp`` and ``mask`` columns. Relative
            paths in a CSV are relative to the CSV's folder.

    Returns:
        The slides in input order, and unsupported files found in folders (also logged).

    Raises:
        ConfigError: an input does not exist, a CSV is malformed, or two slides share an id.
    """
    slides: list[SlideInput] = []
    skipped: list[Path] = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            found, unsupported = _scan_folder(entry)
            slides.extend(SlideInput(path, default_slide_id(path)) for path in found)
            skipped.extend(unsupported)
        elif entry.is_file() and entry.suffix.lower() == ".csv":
            slides.extend(read_manifest_csv(entry))
        elif entry.is_file():
            slides.append(SlideInput(entry.resolve(), default_slide_id(entry)))
        else:
            raise ConfigError(f"input {entry} does not exist")

    for path in skipped:
        _logger.warning("skipping %s: no reader supports %r files (supported: %s)", path, path.suffix, ", ".join(SUPPORTED_EXTENSIONS))
    _check_unique_ids(slides)
    return Discovery(slides=slides, skipped=skipped)


def _scan_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    found: list[Path] = []
    unsupported: list[Path] = []
    dicom_series: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if _inside_mirax_data_folder(path):
            continue
        extension = slide_extension(path)
        if extension == ".dcm":
            dicom_series.setdefault(path.parent, []).append(path)
        elif extension in SUPPORTED_EXTENSIONS:
            found.append(path.resolve())
        elif path.suffix.lower() not in _IGNORED_SUFFIXES:
            unsupported.append(path)
    # A DICOM slide is a folder with one file per pyramid level: open it through the largest file.
    for series in dicom_series.values():
        found.append(max(series, key=lambda p: p.stat().st_size).resolve())
    return sorted(found), unsupported


def _inside_mirax_data_folder(path: Path) -> bool:
    return (path.parent.with_suffix(".mrxs")).is_file()


def read_manifest_csv(path: Path) -> list[SlideInput]:
    """Read a CSV manifest with columns ``path`` and optionally ``slide_id``, ``mpp``, ``mask``."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc}") from exc
    if not rows or "path" not in rows[0]:
        raise ConfigError(f"manifest {path} needs a 'path' column (optional: slide_id, mpp, mask)")

    slides = []
    for line, row in enumerate(rows, start=2):
        slide_path = _relative_to(path, row["path"])
        if slide_path is None:
            raise ConfigError(f"{path}:{line}: empty path")
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError as exc:
            raise ConfigError(f"{path}:{line}: mpp {mpp_text!r} is not a number (um/px, e.g. 0.25)") from exc
        if mpp is not None and not 0 < mpp < 100:
            raise ConfigError(f"{path}:{line}: mpp {mpp} is outside (0, 100) um/px")
        slide_id = _safe_id((row.get("slide_id") or "").strip()) if (row.get("slide_id") or "").strip() else default_slide_id(slide_path)
        slides.append(SlideInput(slide_path, slide_id, mpp, _relative_to(path, row.get("mask"))))
    return slides


def _relative_to(manifest: Path, value: str | None) -> Path | None:
    if value is None or not value.strip():
        return None
    candidate = Path(value.strip()).expanduser()
    return (candidate if candidate.is_absolute() else manifest.parent / candidate).resolve()


def _check_unique_ids(slides: list[SlideInput]) -> None:
    seen: dict[str, Path] = {}
    for slide in slides:
        if slide.slide_id in seen and seen[slide.slide_id] != slide.path:
            raise ConfigError(
                f"slide id {slide.slide_id!r} is used by both {seen[slide.slide_id]} and {slide.path}: give unique "
                "ids in a CSV manifest (column slide_id)"
            )
        seen[slide.slide_id] = slide.path
