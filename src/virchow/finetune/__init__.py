"""Fine-tuning Virchow on labelled tiles, exporting the result, and scoring tiles with it."""

from virchow.finetune.config import DEFAULT_LR, MODES, FinetuneConfig
from virchow.finetune.export import ClassifierHead, export_classifier, load_head
from virchow.finetune.modes import TileClassifier, apply_mode, merged_backbone_state_dict
from virchow.finetune.predict import PredictResult, predict_tiles
from virchow.finetune.train import FinetuneResult, TrainingDivergedError, run_finetune

__all__ = [
    "DEFAULT_LR",
    "MODES",
    "ClassifierHead",
    "FinetuneConfig",
    "FinetuneResult",
    "PredictResult",
    "TileClassifier",
    "TrainingDivergedError",
    "apply_mode",
    "export_classifier",
    "load_head",
    "merged_backbone_state_dict",
    "predict_tiles",
    "run_finetune",
]
