"""Typed configuration of ``virchow pretrain``.

The defaults follow the DINOv2 recipe (``ssl_default_config.yaml`` and ``train/vitg14.yaml`` of
facebookresearch/dinov2) except where noted, with all schedules counted in iterations. YAML files and
command-line ``key=value`` overrides are merged onto these dataclasses once, by :func:`load_config`;
the rest of the package reads only the resulting :class:`PretrainConfig`. Every key is lower snake
case.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from virchow.errors import ConfigError

_logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """Backbone of the student and the teacher.

    Attributes:
        name: registry name, for example ``virchow2``, ``vit-b14-swiglu`` or ``virchow-test``.
        weights: ``scratch`` for timm's random initialisation, ``official`` for the variant's
            Hugging Face repository, or anything ``load_model`` accepts (``hf-hub:OWNER/REPO``, a
            directory in the Hugging Face layout, a checkpoint file).
        drop_path_rate: stochastic depth of the student (the teacher never drops paths).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
    """

    name: str = "virchow2"
    weights: str = "scratch"
    drop_path_rate: float = 0.4
    grad_checkpointing: bool = False


@dataclass
class HeadConfig:
    """Projection head: an MLP to a bottleneck, then cosine similarity to prototypes.

    Attributes:
        n_prototypes: output dimension K of the head (DINOv2 ViT-g uses 131072).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: dimension of the L2-normalised features compared with the prototypes.
        n_layers: MLP layers before the prototypes.
    """

    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_layers: int = 3


@dataclass
class DinoConfig:
    """Class-token self-distillation loss.

    Attributes:
        loss_weight: weight of the DINO loss in the total.
        head: projection head of the class token.
        centering: ``sinkhorn_knopp`` (DINOv2) or ``softmax`` centring of the teacher output with a
            running mean (DINO).
        center_momentum: momentum of the running centre for ``softmax`` centring.
        sinkhorn_iterations: Sinkhorn-Knopp normalisation rounds.
        student_temp: softmax temperature of the student.
    """

    loss_weight: float = 1.0
    head: HeadConfig = field(default_factory=HeadConfig)
    centering: Literal["sinkhorn_knopp", "softmax"] = "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1


@dataclass
class IbotConfig:
    """Masked-patch (iBOT) loss on the global crops.

    Attributes:
        loss_weight: weight of the iBOT loss in the total; 0 disables masking and the loss.
        separate_head: give the patch tokens their own head instead of sharing the DINO head.
        head: the separate head, used only when ``separate_head`` is true.
        mask_ratio: range of the fraction of patches masked in a masked crop.
        mask_probability: probability that a global crop is masked at all.
    """

    loss_weight: float = 1.0
    separate_head: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5


@dataclass
class RegularizerConfig:
    """Uniformity regulariser on the student's global class tokens.

    Attributes:
        kind: ``koleo`` (DINOv2), ``kde`` (Virchow2) or ``none``.
        weight: weight in the total loss.
        kde_concentration: von Mises-Fisher kernel concentration of the KDE regulariser.
        scope: ``global`` gathers the class tokens of all ranks first, so the result does not
            depend on the number of processes. ``rank`` uses each rank's batch alone, as DINOv2 does.
    """

    kind: Literal["koleo", "kde", "none"] = "koleo"
    weight: float = 0.1
    kde_concentration: float = 5.0
    scope: Literal["global", "rank"] = "global"


@dataclass
class TeacherConfig:
    """Teacher update and sharpening.

    Attributes:
        momentum: EMA momentum at the first iteration; it follows a cosine schedule to ``momentum_end``.
        momentum_end: EMA momentum at the last iteration.
        temp: teacher softmax temperature after the warm-up.
        warmup_temp: teacher temperature at the first iteration.
        temp_warmup_iterations: iterations of the linear temperature warm-up.
    """

    momentum: float = 0.994
    momentum_end: float = 1.0
    temp: float = 0.07
    warmup_temp: float = 0.04
    temp_warmup_iterations: int = 37500


@dataclass
class OptimConfig:
    """AdamW, learning-rate and weight-decay schedules.

    Attributes:
        lr: peak learning rate for a global batch of 1024 images, scaled by ``lr_scaling``.
        lr_scaling: ``sqrt`` multiplies ``lr`` by sqrt(global batch / 1024), ``linear`` by the
            ratio itself, ``none`` uses ``lr`` as it is.
        min_lr: learning rate at the last iteration (cosine decay).
        warmup_iterations: linear learning-rate warm-up from 0.
        weight_decay: weight decay at the first iteration.
        weight_decay_end: weight decay at the last iteration (cosine schedule).
        betas: AdamW betas.
        clip_grad: maximum global gradient norm; 0 disables clipping.
        layerwise_decay: learning rate of block i is multiplied by decay ** (depth + 1 - i).
        patch_embed_lr_mult: extra learning-rate factor of the patch embedding.
        freeze_last_layer_iterations: iterations during which the prototypes are not updated.
    """

    lr: float = 2e-4
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    min_lr: float = 1e-6
    warmup_iterations: int = 12500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    layerwise_decay: float = 1.0
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_iterations: int = 1250


@dataclass
class CropsConfig:
    """Multi-crop generation and photometric augmentation.

    Attributes:
        mode: ``crop_resize`` (DINOv2 random-resized crops) or ``extended_context`` (Virchow2:
            crops cut at almost native scale from a larger context region).
        global_size: side of the two global crops in pixels.
        local_size: side of the local crops in pixels.
        n_local: number of local crops; 0 disables them.
        global_scale: ``crop_resize`` area fraction of the source kept by a global crop.
        local_scale: ``crop_resize`` area fraction of the source kept by a local crop.
        context_size: side of the source region for ``extended_context``, in pixels at the target mpp.
        ect_scale: ``extended_context`` range of crop side / output side.
        ect_ratio: ``extended_context`` range of crop aspect ratio (width / height).
        horizontal_flip: probability of a horizontal flip.
        vertical_flip: probability of a vertical flip (Virchow2 adds them).
        rotate90: rotate every crop by a random multiple of 90 degrees.
        color_jitter: probability of brightness, contrast, saturation and hue jitter.
        brightness: brightness jitter strength.
        contrast: contrast jitter strength.
        saturation: saturation jitter strength.
        hue: hue jitter strength (fraction of the hue circle).
        grayscale: probability of converting a crop to grey.
        blur_global: Gaussian-blur probability of the first and the second global crop.
        blur_local: Gaussian-blur probability of a local crop.
        solarize: solarisation probability of the second global crop.
    """

    mode: Literal["crop_resize", "extended_context"] = "crop_resize"
    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    context_size: int = 392
    ect_scale: tuple[float, float] = (0.9, 1.1)
    ect_ratio: tuple[float, float] = (0.95, 1.05)
    horizontal_flip: float = 0.5
    vertical_flip: float = 0.0
    rotate90: bool = False
    color_jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur_global: tuple[float, float] = (1.0, 0.1)
    blur_local: float = 0.5
    solarize: float = 0.2


@dataclass
class DataConfig:
    """Where training images come from.

    Attributes:
        source: ``tiles`` (image folders) or ``slides`` (whole-slide images read on the fly).
        tile_dirs: folders searched recursively for tile images (``source=tiles``).
        slides: slide files, folders of slides, or text files listing one slide path per line
            (``source=slides``).
        mpp: pixel sizes in um/px at which slide regions are read; several values mix magnifications.
        mpp_weights: sampling probability of each ``mpp`` value; None samples them uniformly.
        region_size: side in pixels (at the target mpp) of each slide region; None reads
            ``crops.context_size`` for ``extended_context`` and ``crops.global_size`` otherwise.
        tissue_threshold: minimum tissue fraction of a slide region.
        num_workers: DataLoader processes per rank.
    """

    source: Literal["tiles", "slides"] = "tiles"
    tile_dirs: list[str] = field(default_factory=list)
    slides: list[str] = field(default_factory=list)
    mpp: list[float] = field(default_factory=lambda: [0.5])
    mpp_weights: list[float] | None = None
    region_size: int | None = None
    tissue_threshold: float = 0.5
    num_workers: int = 4


@dataclass
class TrainConfig:
    """Run length, batch, precision, distribution, logging and checkpoints.

    Attributes:
        output_dir: run directory for the config, metrics, checkpoints and the exported teacher.
        iterations: optimiser steps of the whole run (all schedules end here).
        batch_size_per_rank: images per process; each image yields 2 global and ``n_local`` crops.
        seed: seed of the model initialisation, the data stream and the masks.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``; under torchrun each rank takes ``cuda:LOCAL_RANK``.
        precision: autocast precision; fp16 adds a gradient scaler.
        sharding: ``ddp`` replicates the model on every rank, ``fsdp`` shards it (for the full-size
            model on small GPUs).
        log_every: iterations between two lines of ``metrics.jsonl``.
        checkpoint_every: iterations between two checkpoints (and at the end).
        keep_checkpoints: numbered checkpoints kept besides ``last.pt``.
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        stop_after: iterations this invocation runs before it writes a checkpoint and returns, for
            example to fit a scheduler's time limit; 0 runs to ``iterations``. Schedules always
            span ``iterations``.
        export_every: iterations between two exports of the teacher; 0 exports only at the end.
    """

    output_dir: str = "pretrain-run"
    iterations: int = 125000
    batch_size_per_rank: int = 32
    seed: int = 0
    device: str = "auto"
    precision: Precision = "bf16"
    sharding: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = 10
    checkpoint_every: int = 2500
    keep_checkpoints: int = 2
    resume: bool = True
    stop_after: int = 0
    export_every: int = 0


@dataclass
class KnnConfig:
    """Optional k-nearest-neighbour accuracy of the teacher on a labelled tile folder.

    Attributes:
        tile_dir: folder with one sub-folder of tiles per class; None disables the monitor.
        every: iterations between two evaluations (and at the end).
        k: neighbours that vote.
        temperature: temperature of the similarity weights of the votes.
        batch_size: tiles per forward pass.
    """

    tile_dir: str | None = None
    every: int = 2500
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64


@dataclass
class PretrainConfig:
    """The whole configuration of one pretraining run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


#: Folder of the bundled configurations (``default`` and presets such as ``virchow2-continue``).
PRESET_DIR = Path(__file__).resolve().parent / "configs"


def list_presets() -> list[str]:
    """Return the names of the bundled configurations."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """Return ``path`` if it is a file, else the bundled preset of that name.

    Raises:
        ConfigError: neither exists; the message lists the presets.
    """
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    preset = PRESET_DIR / f"{candidate.name.removesuffix('.yaml')}.yaml"
    if candidate.parent == Path(".") and preset.is_file():
        return preset
    raise ConfigError(f"config file {path} not found; bundled presets: {', '.join(list_presets())}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Merge a YAML file and ``key=value`` overrides onto the defaults and validate the result.

    Args:
        path: YAML file with any subset of the keys, or the name of a bundled preset (see
            :func:`list_presets`); None uses the defaults alone.
        overrides: dotted ``section.key=value`` strings, applied after the file.

    Raises:
        ConfigError: the file is missing or invalid, a key is unknown, a value has the wrong type,
            or the values contradict each other.
    """
    merged = OmegaConf.structured(PretrainConfig)
    try:
        if path is not None:
            path = resolve_config_path(path)
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"invalid override {item!r}: write section.key=value, as in train.iterations=1000")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        source = f"{path} or the overrides" if path else "the overrides"
        raise ConfigError(f"invalid configuration in {source}: {exc}") from exc
    assert isinstance(cfg, PretrainConfig)
    validate_config(cfg)
    return cfg


def _check_range(name: str, pair: Sequence[float], low: float, high: float) -> None:
    if len(pair) != 2 or not (low <= pair[0] <= pair[1] <= high):
        raise ConfigError(f"{name} must be two numbers with {low} <= first <= second <= {high}, got {list(pair)}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability between 0 and 1, got {value}")


def validate_config(cfg: PretrainConfig) -> None:
    """Check values that the types alone do not constrain.

    Raises:
        ConfigError: the first invalid value, with the rule it breaks.
    """
    train, optim, crops, data = cfg.train, cfg.optim, cfg.crops, cfg.data
    for name, value in (
        ("train.iterations", train.iterations),
        ("train.batch_size_per_rank", train.batch_size_per_rank),
        ("train.log_every", train.log_every),
        ("train.checkpoint_every", train.checkpoint_every),
        ("dino.head.n_prototypes", cfg.dino.head.n_prototypes),
        ("ibot.head.n_prototypes", cfg.ibot.head.n_prototypes),
        ("crops.global_size", crops.global_size),
        ("crops.local_size", crops.local_size),
        ("knn.k", cfg.knn.k),
        ("knn.every", cfg.knn.every),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    for name, value in (("crops.global_size", crops.global_size), ("crops.local_size", crops.local_size)):
        if value % 14:
            raise ConfigError(f"{name} must be a multiple of the patch size 14, got {value}")
    if min(crops.n_local, train.export_every, train.keep_checkpoints, train.stop_after, data.num_workers) < 0:
        raise ConfigError(
            "crops.n_local, train.export_every, train.keep_checkpoints, train.stop_after and data.num_workers must be >= 0"
        )
    if cfg.dino.loss_weight <= 0:
        raise ConfigError(f"dino.loss_weight must be positive, got {cfg.dino.loss_weight}")
    if cfg.ibot.loss_weight < 0 or cfg.regularizer.weight < 0:
        raise ConfigError("ibot.loss_weight and regularizer.weight must be >= 0")
    if cfg.teacher.temp <= 0 or cfg.teacher.warmup_temp <= 0 or cfg.dino.student_temp <= 0:
        raise ConfigError("teacher.temp, teacher.warmup_temp and dino.student_temp must be positive")
    if not 0.0 <= cfg.teacher.momentum <= cfg.teacher.momentum_end <= 1.0:
        raise ConfigError(
            f"teacher momentum must satisfy 0 <= momentum <= momentum_end <= 1, got "
            f"{cfg.teacher.momentum} and {cfg.teacher.momentum_end}"
        )
    if not 0.0 <= cfg.model.drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {cfg.model.drop_path_rate}")
    if optim.lr <= 0 or optim.min_lr < 0 or optim.clip_grad < 0 or not 0 < optim.layerwise_decay <= 1:
        raise ConfigError("optim.lr must be positive, optim.min_lr and optim.clip_grad >= 0, optim.layerwise_decay in (0, 1]")

    _check_range("ibot.mask_ratio", cfg.ibot.mask_ratio, 0.0, 1.0)
    _check_range("crops.global_scale", crops.global_scale, 0.0, 1.0)
    _check_range("crops.local_scale", crops.local_scale, 0.0, 1.0)
    _check_range("crops.ect_scale", crops.ect_scale, 0.01, 100.0)
    _check_range("crops.ect_ratio", crops.ect_ratio, 0.01, 100.0)
    _check_range("optim.betas", optim.betas, 0.0, 1.0)
    for name in ("horizontal_flip", "vertical_flip", "color_jitter", "grayscale", "blur_local", "solarize"):
        _check_probability(f"crops.{name}", getattr(crops, name))
    for value in crops.blur_global:
        _check_probability("crops.blur_global", value)
    _check_probability("ibot.mask_probability", cfg.ibot.mask_probability)
    _check_probability("data.tissue_threshold", data.tissue_threshold)
    if crops.mode == "extended_context" and crops.context_size < crops.global_size:
        raise ConfigError(
            f"crops.context_size ({crops.context_size}) must be at least crops.global_size ({crops.global_size})"
        )

    if data.source == "tiles" and not data.tile_dirs:
        raise ConfigError("data.source=tiles needs data.tile_dirs, for example data.tile_dirs=[/data/tiles]")
    if data.source == "slides" and not data.slides:
        raise ConfigError("data.source=slides needs data.slides: slide files, folders or text files listing slides")
    if not data.mpp or any(m <= 0 for m in data.mpp):
        raise ConfigError(f"data.mpp must list positive pixel sizes in um/px, got {data.mpp}")
    if data.mpp_weights is not None and (
        len(data.mpp_weights) != len(data.mpp) or any(w < 0 for w in data.mpp_weights) or sum(data.mpp_weights) <= 0
    ):
        raise ConfigError(
            f"data.mpp_weights must give one non-negative weight per data.mpp value ({len(data.mpp)}), "
            f"not all zero; got {data.mpp_weights}"
        )


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """Return the config as plain JSON-compatible containers (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return plain(container)


def config_from_dict(values: dict[str, Any]) -> PretrainConfig:
    """Rebuild a config saved by :func:`config_to_dict` (for example from a checkpoint)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), values))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the saved configuration does not match this version of virchow: {exc}") from exc
    assert isinstance(cfg, PretrainConfig)
    return cfg


def git_commit(start: str | Path | None = None) -> str:
    """Return the commit of the git checkout that contains this package, or ``unknown``."""
    directory = Path(start) if start else Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else "unknown"


def save_run_info(cfg: PretrainConfig, output_dir: str | Path, argv: Sequence[str] | None = None) -> None:
    """Write the resolved config (``config.yaml``) and ``run.json`` (git commit, command line, python).

    An existing ``config.yaml`` from an earlier start of the same run is kept as ``config.N.yaml``
    so that a resumed run with changed settings stays traceable.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / "config.yaml"
    if target.exists():
        index = 1
        while (output_dir / f"config.{index}.yaml").exists():
            index += 1
        target.rename(output_dir / f"config.{index}.yaml")
    target.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    info = {
        "git_commit": git_commit(),
        "argv": list(sys.argv if argv is None else argv),
        "python": sys.version.split()[0],
    }
    (output_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


def log_options(cfg: PretrainConfig) -> None:
    """Log every option as a greppable ``OPTION section.key = value`` line."""
    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            _logger.info("OPTION %s = %s", prefix, node)

    walk("", config_to_dict(cfg))
