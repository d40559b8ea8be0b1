"""Read checkpoint files into a state dict, and diagnose ones that do not fit the model."""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from virchow.errors import WeightsFormatError, WeightsMismatchError

_logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_MAX_LISTED = 8


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    """Return the hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` checkpoint into float32 CPU tensors.

    Pickle-based files are read with ``weights_only=True``, so a checkpoint cannot run code. A
    state dict wrapped in ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and a
    ``module.`` prefix left by DistributedDataParallel is removed; both are logged.

    Raises:
        WeightsFormatError: the file is truncated, corrupt, of an unknown type, or contains
            something other than a mapping of names to tensors.
    """
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise WeightsFormatError(
            f"{path}: unknown checkpoint type {suffix!r}; expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            obj = load_safetensors(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
        raise WeightsFormatError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}). The file may be truncated "
            "by an interrupted download or not be a model file at all: download it again and compare its "
            "size and SHA-256 with the source."
        ) from exc

    state_dict = _unwrap(obj, path)
    return {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                _logger.info("%s: using the state dict stored under key %r", path.name, key)
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFormatError(
            f"{path} does not contain a state dict (a mapping of parameter names to tensors); "
            f"found {type(obj).__name__}. Save the model with torch.save(model.state_dict(), ...) or safetensors."
        )
    if all(key.startswith("module.") for key in obj):
        _logger.info("%s: removing the 'module.' prefix left by DistributedDataParallel", path.name)
        obj = {key.removeprefix("module."): value for key, value in obj.items()}
    return obj


def check_state_dict(
    expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], *, model_name: str, source: str
) -> None:
    """Compare checkpoint keys and shapes with the model's and explain any difference.

    Args:
        expected: parameter name to shape of the freshly built model.
        state_dict: the checkpoint.
        model_name: registry name of the model, for the message.
        source: where the checkpoint came from, for the message.

    Raises:
        WeightsMismatchError: keys are missing or unexpected, or shapes differ. The message lists
            them and names the likely cause.
    """
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key])}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key])
    ]
    if not (missing or unexpected or mismatched):
        return

    causes = _likely_causes(expected, state_dict, missing, unexpected, model_name)
    lines = [f"weights from {source} do not fit model {model_name!r}."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:_MAX_LISTED]) + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")
            lines.append(f"  {title}: {shown}")
    lines.extend(f"  likely cause: {cause}" for cause in causes)
    raise WeightsMismatchError("\n".join(lines), missing, unexpected, mismatched)


def _likely_causes(
    expected: dict[str, torch.Size],
    state_dict: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    model_name: str,
) -> list[str]:
    causes: list[str] = []

    fc2 = "blocks.0.mlp.fc2.weight"
    if fc2 in expected and fc2 in state_dict and state_dict[fc2].shape[1] != expected[fc2][1]:
        ckpt_in, model_in = state_dict[fc2].shape[1], expected[fc2][1]
        if ckpt_in > model_in:
            causes.append(
                f"the checkpoint's MLP is a plain MLP (fc2 takes {ckpt_in} features, the SwiGLU layer takes "
                f"{model_in}): it was saved from a ViT built without mlp_layer=SwiGLUPacked, so it is not a "
                "Virchow checkpoint"
            )
        else:
            causes.append(
                f"the checkpoint's fc2 takes {ckpt_in} features where a plain MLP would take {model_in}: the "
                "checkpoint uses the packed SwiGLU layer but the model was built without it"
            )

    layer_scale = re.compile(r"blocks\.\d+\.ls[12]\.gamma")
    if any(layer_scale.fullmatch(key) for key in missing):
        causes.append(
            "the checkpoint has no LayerScale parameters (blocks.N.ls1.gamma): it comes from a ViT built "
            "without init_values, not from Virchow"
        )
    if any(layer_scale.fullmatch(key) for key in unexpected):
        causes.append("the checkpoint has LayerScale (blocks.N.ls1.gamma) but the model was built without init_values")

    if "reg_token" in unexpected:
        other = model_name.replace("virchow", "virchow2", 1)
        causes.append(f"the checkpoint has register tokens, so it is a Virchow2 checkpoint: use model {other!r}")
    if "reg_token" in missing:
        other = model_name.replace("virchow2", "virchow", 1)
        causes.append(f"the checkpoint has no register tokens, so it is a Virchow (v1) checkpoint: use model {other!r}")

    width = "pos_embed"
    if not causes and width in expected and width in state_dict and state_dict[width].shape[-1] != expected[width][-1]:
        causes.append(
            f"token width {state_dict[width].shape[-1]} vs {expected[width][-1]}: the checkpoint is of another model size"
        )
    if not causes:
        causes.append("the checkpoint is of another architecture or was saved from a modified model")
    return causes
