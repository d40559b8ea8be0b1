"""Declared specifications of the Virchow model family.

A :class:`ModelSpec` contains everything needed to rebuild a variant exactly: the timm architecture and
its keyword arguments, the Hugging Face repository, the preprocessing, the number of prefix tokens
and the licence. The values for ``virchow`` and ``virchow2`` follow the ``config.json`` published in
the gated repositories ``paige-ai/Virchow`` and ``paige-ai/Virchow2`` and the model card's loading
snippet (``mlp_layer=SwiGLUPacked, act_layer=SiLU``, which the JSON config cannot carry).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from virchow.errors import UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keyword arguments of timm's vit_huge_patch14_224 shared by every Virchow variant. The model card
# also passes the MLP and activation layers, which are classes, so factory.py adds them.
VIRCHOW_MODEL_ARGS: dict[str, Any] = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing of a variant, as timm resolves it from the published pretrained config.

    Attributes:
        input_size: side of the square network input in pixels.
        interpolation: resampling filter of the resize step.
        crop_pct: fraction of the resized image kept by the centre crop (1.0 keeps all of it).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided after subtracting the mean.
    """

    input_size: int = 224
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild one Virchow variant.

    Attributes:
        name: registry name, for example ``virchow``.
        architecture: timm model name the variant is built from.
        model_args: keyword arguments for ``timm.create_model`` except the MLP and activation layers.
        hf_repo: Hugging Face repository of the official weights, or None for local-only variants.
        embed_dim: width of every token.
        num_register_tokens: register tokens between the class token and the patch tokens.
        preprocess: image preprocessing.
        license: licence of the official weights.
        tag: ``pretrained_cfg`` tag of the published config.
        description: one line shown by ``virchow models``.
        mlp_layer: timm MLP layer name; ``SwiGLUPacked`` for every Virchow variant.
    """

    name: str
    architecture: str
    model_args: dict[str, Any]
    hf_repo: str | None
    embed_dim: int
    num_register_tokens: int = 0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    license: str = "Apache-2.0"
    tag: str = ""
    description: str = ""
    mlp_layer: str = "SwiGLUPacked"

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens at the start of the token sequence."""
        return 1 + self.num_register_tokens

    @property
    def default_weights(self) -> str | None:
        """Weights used when none are given: the official Hugging Face repository."""
        return f"hf-hub:{self.hf_repo}" if self.hf_repo else None

    @property
    def num_patch_tokens(self) -> int:
        """Patch tokens for a square input of ``preprocess.input_size`` pixels."""
        patch = int(self.model_args.get("patch_size", 14))
        return (self.preprocess.input_size // patch) ** 2


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec_fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
    """Register the spec returned by ``spec_fn`` under its name; used as a decorator."""
    spec = spec_fn()
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec_fn


def list_models() -> list[str]:
    """Return the registered model names in registration order."""
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """Return the spec registered as ``name``.

    Raises:
        UnknownModelError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Valid names: {', '.join(_REGISTRY)}."
        ) from None


@register_model
def _virchow() -> ModelSpec:
    return ModelSpec(
        name="virchow",
        architecture="vit_huge_patch14_224",
        model_args=dict(VIRCHOW_MODEL_ARGS),
        hf_repo="paige-ai/Virchow",
        embed_dim=1280,
        license="Apache-2.0 with additional terms (no clinical use; attribution requested)",
        tag="virchow_v1",
        description="Virchow (v1): ViT-H/14, 632M parameters, 0.5 um/px tiles",
    )


@register_model
def _virchow2() -> ModelSpec:
    return ModelSpec(
        name="virchow2",
        architecture="vit_huge_patch14_224",
        model_args={**VIRCHOW_MODEL_ARGS, "reg_tokens": 4},
        hf_repo="paige-ai/Virchow2",
        embed_dim=1280,
        num_register_tokens=4,
        license="CC-BY-NC-ND-4.0 (non-commercial academic use only)",
        tag="virchow_v2",
        description="Virchow2: ViT-H/14 with 4 register tokens, mixed magnifications",
    )


# Test variants: the same architecture, kwargs and code path at a width of 160 and a depth of 2.
# 160 is the smallest width for which mlp_ratio 5.3375 gives an even fc1 width (854), which the
# packed SwiGLU layer needs to split into two halves.
_TEST_ARGS = {"embed_dim": 160, "depth": 2, "num_heads": 4}


@register_model
def _virchow_test() -> ModelSpec:
    return ModelSpec(
        name="virchow-test",
        architecture="vit_huge_patch14_224",
        model_args={**VIRCHOW_MODEL_ARGS, **_TEST_ARGS},
        hf_repo=None,
        embed_dim=160,
        license="none (random weights for tests)",
        tag="virchow_test",
        description="tiny Virchow-shaped test model (2 blocks, width 160); random or test weights only",
    )


@register_model
def _virchow2_test() -> ModelSpec:
    return ModelSpec(
        name="virchow2-test",
        architecture="vit_huge_patch14_224",
        model_args={**VIRCHOW_MODEL_ARGS, **_TEST_ARGS, "reg_tokens": 4},
        hf_repo=None,
        embed_dim=160,
        num_register_tokens=4,
        license="none (random weights for tests)",
        tag="virchow2_test",
        description="tiny Virchow2-shaped test model with 4 register tokens",
    )
