"""Resolve a ``weights=`` argument to checkpoint files and record where they came from.

Accepted forms:

- ``hf-hub:OWNER/REPO`` or ``hf-hub:OWNER/REPO@REVISION``: the gated Hugging Face repository. The
  token comes from ``HF_TOKEN`` or a ``huggingface_hub`` login; the local cache is used first and
  ``HF_HUB_OFFLINE=1`` is honoured.
- a directory in the Hugging Face layout (``config.json`` and ``model.safetensors`` or
  ``pytorch_model.bin``), or a single ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` file.
- ``random`` or ``random:SEED``: untrained weights for dry runs, always logged as a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virchow.errors import ConfigError, WeightsAccessError, WeightsFormatError, WeightsMismatchError
from virchow.models.checkpoint import CHECKPOINT_SUFFIXES, sha256_file
from virchow.models.registry import ModelSpec

_logger = logging.getLogger(__name__)

HF_PREFIXES = ("hf-hub:", "hf_hub:")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class WeightsProvenance:
    """Where the weights of a loaded model came from.

    Attributes:
        source: the resolved source, for example ``hf-hub:paige-ai/Virchow@<commit>``, an absolute
            path, or ``random:0``.
        files: checkpoint file name to its SHA-256; empty for random weights.
        random: True when the weights are untrained.
        seed: the seed of random weights.
    """

    source: str
    files: dict[str, str] = field(default_factory=dict)
    random: bool = False
    seed: int | None = None

    def to_attrs(self) -> dict[str, Any]:
        """Return flat attributes for HDF5 files, manifests and HTTP responses."""
        return {
            "weights_source": self.source,
            "weights_sha256": ";".join(f"{name}={digest}" for name, digest in self.files.items()),
            "weights_random": self.random,
        }


@dataclass(frozen=True)
class ResolvedWeights:
    """Checkpoint files found for a ``weights=`` argument, before they are read."""

    source: str
    checkpoint: Path | None
    config: dict[str, Any] | None = None
    seed: int | None = None

    @property
    def random(self) -> bool:
        return self.checkpoint is None


def resolve_weights(weights: str | Path | None, spec: ModelSpec) -> ResolvedWeights:
    """Find the checkpoint file that ``weights`` names, downloading from the Hub if needed.

    Raises:
        ConfigError: ``weights`` is None for a variant without official weights, or the form is invalid.
        WeightsAccessError: the Hub or the local path cannot be reached.
        WeightsFormatError: a directory lacks a weight file, or its ``config.json`` is invalid.
    """
    if weights is None:
        if spec.default_weights is None:
            raise ConfigError(
                f"model {spec.name!r} has no official weights: pass weights='random' for a dry run or a checkpoint path"
            )
        weights = spec.default_weights

    text = str(weights)
    if text == "random" or text.startswith("random:"):
        return ResolvedWeights(source=text if ":" in text else "random:0", checkpoint=None, seed=_parse_seed(text))
    for prefix in HF_PREFIXES:
        if text.startswith(prefix):
            return _resolve_hub(text.removeprefix(prefix), spec)

    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_directory(path.resolve())
    if path.is_file():
        return ResolvedWeights(source=str(path.resolve()), checkpoint=path.resolve())
    raise WeightsAccessError(
        f"weights {text!r} not found: give an existing checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}), a "
        "directory with config.json and model.safetensors or pytorch_model.bin, 'hf-hub:OWNER/REPO', or 'random'"
    )


def _parse_seed(text: str) -> int:
    if ":" not in text:
        return 0
    seed = text.split(":", 1)[1]
    if not seed.isdigit():
        raise ConfigError(f"invalid random weights {text!r}: the seed must be a non-negative integer, as in 'random:0'")
    return int(seed)


def _resolve_directory(path: Path) -> ResolvedWeights:
    checkpoint = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if checkpoint is None:
        raise WeightsFormatError(
            f"{path} has none of {', '.join(HF_WEIGHT_FILES)}: a weights directory needs the Hugging Face "
            "layout (config.json plus one of those files)"
        )
    config = _read_config(path / "config.json")
    return ResolvedWeights(source=str(path), checkpoint=checkpoint, config=config)


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        _logger.warning("%s is missing: the architecture is checked against the checkpoint's keys only", path)
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsFormatError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsFormatError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def check_config(config: dict[str, Any] | None, spec: ModelSpec, source: str) -> None:
    """Check a published ``config.json`` against the spec before reading gigabytes of weights.

    Raises:
        WeightsMismatchError: the config names another architecture or the other Virchow variant.
    """
    if config is None:
        return
    architecture = config.get("architecture")
    if architecture is not None and architecture != spec.architecture:
        raise WeightsMismatchError(
            f"config.json of {source} is for architecture {architecture!r}, but model {spec.name!r} is "
            f"{spec.architecture!r}",
            [],
            [],
            [],
        )
    reg_tokens = int((config.get("model_args") or {}).get("reg_tokens", 0) or 0)
    if reg_tokens != spec.num_register_tokens:
        variant = "virchow2" if reg_tokens else "virchow"
        raise WeightsMismatchError(
            f"config.json of {source} declares {reg_tokens} register tokens but model {spec.name!r} has "
            f"{spec.num_register_tokens}: these look like {variant!r} weights, so pass that model name",
            [],
            [],
            [],
        )


def _resolve_hub(repo_spec: str, spec: ModelSpec) -> ResolvedWeights:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo_id, _, revision = repo_spec.partition("@")
    revision = revision or None
    how_to = (
        f"Request access at https://huggingface.co/{repo_id} (the account's primary e-mail must be your "
        "institutional address), then run 'hf auth login' or set HF_TOKEN. To use a local copy instead, pass "
        "--weights /path/to/dir (config.json plus model.safetensors or pytorch_model.bin)."
    )

    def download(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except GatedRepoError as exc:
            raise WeightsAccessError(f"no access to the gated repository {repo_id}. {how_to}") from exc
        except RepositoryNotFoundError as exc:
            raise WeightsAccessError(
                f"repository {repo_id} was not found or needs a token that this machine does not have. {how_to}"
            ) from exc
        except LocalEntryNotFoundError as exc:
            raise WeightsAccessError(
                f"{filename} of {repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
                f"(offline mode or no network). {how_to}"
            ) from exc
        except EntryNotFoundError:
            raise
        except (HfHubHTTPError, OSError) as exc:
            raise WeightsAccessError(f"downloading {filename} from {repo_id} failed: {exc}. {how_to}") from exc

    config_path = download("config.json")
    config = _read_config(config_path)
    check_config(config, spec, f"hf-hub:{repo_id}")
    checkpoint = None
    for filename in HF_WEIGHT_FILES:
        try:
            checkpoint = download(filename)
            break
        except EntryNotFoundError:
            continue
    if checkpoint is None:
        raise WeightsFormatError(f"repository {repo_id} has none of {', '.join(HF_WEIGHT_FILES)}")

    # Cached files live in .../snapshots/<commit>/<file>: record the commit for provenance.
    commit = checkpoint.parent.name
    return ResolvedWeights(source=f"hf-hub:{repo_id}@{commit}", checkpoint=checkpoint, config=config)


def provenance_of(resolved: ResolvedWeights) -> WeightsProvenance:
    """Hash the checkpoint file and return the provenance record."""
    if resolved.checkpoint is None:
        return WeightsProvenance(source=resolved.source, random=True, seed=resolved.seed)
    return WeightsProvenance(source=resolved.source, files={resolved.checkpoint.name: sha256_file(resolved.checkpoint)})
