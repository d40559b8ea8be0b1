"""Export a fine-tuned classifier, and read the exported head back.

An export directory holds:

- ``config.json`` and ``model.safetensors``: the backbone in the Hugging Face layout, with LoRA
  updates merged into the weights, so ``load_model(name, DIR)`` and ``--weights DIR`` load it.
- ``head.pt``: the linear classifier as ``{"weight": (C, F), "bias": (C,)}`` float32 tensors.
- ``classes.json``: the class names in output order, the embedding kind the head reads, the
  model name and the feature count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from virchow.errors import ConfigError, WeightsFormatError
from virchow.finetune.modes import TileClassifier, merged_backbone_state_dict
from virchow.models import build_model, embedding_shape, get_model_spec
from virchow.models.export import save_pretrained

_logger = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
CLASSES_FILE = "classes.json"
HEAD_EMBEDDINGS = ("cls+mean", "cls", "mean")


@dataclass(frozen=True)
class ClassifierHead:
    """A linear classifier over Virchow embeddings.

    Attributes:
        classes: class names in output order.
        embedding: embedding kind the head reads (``cls+mean``, ``cls`` or ``mean``).
        model: registry name of the backbone it was trained on.
        weight: (C, F) float32 weights.
        bias: (C,) float32 biases.
    """

    classes: list[str]
    embedding: str
    model: str
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return (N, C) logits of float32 (N, F) embeddings."""
        return embeddings.float() @ self.weight.T + self.bias

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Return (N, C) softmax probabilities of float32 (N, F) embeddings."""
        return torch.softmax(self.logits(embeddings), dim=1)


def export_classifier(
    classifier: TileClassifier, classes: list[str], directory: str | Path, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write the backbone (LoRA merged), ``head.pt`` and ``classes.json`` into ``directory``.

    Args:
        classifier: the trained classifier, which is not modified.
        classes: class names in output order.
        directory: created if missing. Existing export files are replaced.
        extra: JSON-serialisable provenance stored in ``config.json`` under ``virchow``.

    Returns:
        The export directory.
    """
    directory = Path(directory)
    spec = classifier.spec

    # The merged state dict must load strictly into a plain backbone, which proves that no adapter
    # key is left over and that ``load_model(spec.name, directory)`` will accept the files.
    merged = merged_backbone_state_dict(classifier.backbone)
    plain = build_model(spec, device="meta")
    plain.load_state_dict(merged, strict=True, assign=True)
    save_pretrained(plain, spec, directory, extra=extra)

    head = {
        "weight": classifier.head.weight.detach().to("cpu", torch.float32).contiguous(),
        "bias": classifier.head.bias.detach().to("cpu", torch.float32).contiguous(),
    }
    torch.save(head, directory / HEAD_FILE)
    metadata = {
        "classes": list(classes),
        "embedding": classifier.embedding,
        "model": spec.name,
        "in_features": int(head["weight"].shape[1]),
        "num_classes": len(classes),
    }
    (directory / CLASSES_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    _logger.info("exported backbone and head (%d classes, %s embedding) to %s", len(classes), classifier.embedding, directory)
    return directory


def load_head(directory: str | Path) -> ClassifierHead:
    """Read ``head.pt`` and ``classes.json`` from an export directory and check that they agree.

    Raises:
        WeightsFormatError: a file is missing or unreadable, or the shapes do not match the classes,
            the embedding kind or the model.
    """
    directory = Path(directory)
    head_path, classes_path = directory / HEAD_FILE, directory / CLASSES_FILE
    for path in (head_path, classes_path):
        if not path.is_file():
            raise WeightsFormatError(
                f"{path} not found: give the export directory of 'virchow finetune' (RUN_DIR/export), which "
                f"holds {HEAD_FILE} and {CLASSES_FILE}"
            )
    try:
        metadata = json.loads(classes_path.read_text())
        tensors = torch.load(head_path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsFormatError(f"cannot read the classifier head in {directory}: {exc}") from exc
    if not isinstance(metadata, dict) or not {"classes", "embedding", "model"} <= set(metadata):
        raise WeightsFormatError(f"{classes_path} must be a JSON object with classes, embedding and model")
    if not isinstance(tensors, dict) or not {"weight", "bias"} <= set(tensors):
        raise WeightsFormatError(f"{head_path} must hold a dict with 'weight' and 'bias' tensors")

    if metadata["embedding"] not in HEAD_EMBEDDINGS:
        raise WeightsFormatError(
            f"{classes_path} names embedding {metadata['embedding']!r}, but a head reads one of {', '.join(HEAD_EMBEDDINGS)}"
        )
    try:
        spec = get_model_spec(metadata["model"])
    except ConfigError as exc:
        raise WeightsFormatError(f"{classes_path} names an unknown model: {exc}") from exc
    (features,) = embedding_shape(metadata["embedding"], spec.embed_dim, spec.num_patch_tokens)
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    classes = [str(name) for name in metadata["classes"]]
    if tuple(weight.shape) != (len(classes), features) or tuple(bias.shape) != (len(classes),):
        raise WeightsFormatError(
            f"head in {directory} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}, but "
            f"{len(classes)} classes over {metadata['embedding']} embeddings of {spec.name} need "
            f"({len(classes)}, {features}) and ({len(classes)},)"
        )
    return ClassifierHead(classes=classes, embedding=metadata["embedding"], model=spec.name, weight=weight, bias=bias)
