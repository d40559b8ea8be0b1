"""Print the versions, devices and weights that this installation can use."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from virchow import __version__
from virchow.embed.device import cpu_supports_bf16
from virchow.models import get_model_spec, list_models

HELP = "show versions, devices, bf16 support, Hugging Face token and cached weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _openslide_versions() -> str:
    try:
        import openslide

        return f"openslide-python {openslide.__version__}, library {openslide.__library_version__}"
    except (ImportError, OSError) as exc:
        return f"not available ({exc})"


def _cached_weights(repo_id: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return "not cached"


def run(args: argparse.Namespace) -> int:
    import timm
    from huggingface_hub import get_token

    lines = [
        f"virchow {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__}, timm {timm.__version__}",
        f"openslide: {_openslide_versions()}",
        f"cpu: {os.cpu_count()} cores, native bf16: {cpu_supports_bf16()}",
        f"cuda: {torch.cuda.is_available()}",
    ]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(
            f"  cuda:{index} {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}"
        )
    lines.append(f"mps: {torch.backends.mps.is_available()}")
    lines.append(f"hugging face token: {'present' if get_token() else 'absent'}")
    lines.append(f"hugging face offline mode: {os.environ.get('HF_HUB_OFFLINE', '0')}")
    for name in list_models():
        spec = get_model_spec(name)
        if spec.hf_repo:
            lines.append(f"weights {spec.hf_repo}: {_cached_weights(spec.hf_repo)}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
