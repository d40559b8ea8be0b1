"""Write a backbone in the Hugging Face layout that ``weights=DIR`` loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from virchow.models.registry import ModelSpec


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """Return the ``config.json`` content of the official repositories for ``spec``."""
    pre = spec.preprocess
    return {
        "architecture": spec.architecture,
        "model_args": dict(spec.model_args),
        "pretrained_cfg": {
            "tag": spec.tag,
            "custom_load": False,
            "input_size": [3, pre.input_size, pre.input_size],
            "fixed_input_size": False,
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "crop_mode": "center",
            "mean": list(pre.mean),
            "std": list(pre.std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": spec.license,
        },
    }


def save_pretrained(
    model: nn.Module, spec: ModelSpec, directory: str | Path, *, file_format: str = "safetensors", extra: dict | None = None
) -> Path:
    """Save ``model`` as ``config.json`` plus ``model.safetensors`` (or ``pytorch_model.bin``).

    Args:
        model: a backbone built from ``spec`` (LoRA adapters must be merged first).
        spec: the variant, written to ``config.json``.
        directory: created if missing; existing weight files are replaced atomically.
        file_format: ``safetensors`` or ``bin``.
        extra: optional JSON-serialisable provenance added to ``config.json`` under ``virchow``.

    Returns:
        The path of the weight file.
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    if file_format == "safetensors":
        target = directory / "model.safetensors"
        tmp = target.with_name(target.name + ".tmp")
        save_file(state_dict, str(tmp))
    elif file_format == "bin":
        target = directory / "pytorch_model.bin"
        tmp = target.with_name(target.name + ".tmp")
        torch.save(state_dict, tmp)
    else:
        raise ValueError(f"file_format must be 'safetensors' or 'bin', not {file_format!r}")
    os.replace(tmp, target)

    config = hf_config(spec)
    if extra:
        config["virchow"] = extra
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target
