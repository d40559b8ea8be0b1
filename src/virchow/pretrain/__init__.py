"""Self-supervised pretraining of Virchow backbones with the DINOv2 objective.

Entry points: :func:`load_config` builds a :class:`PretrainConfig` from YAML and overrides,
:func:`train` runs (or resumes) a pretraining run, and :func:`export_checkpoint` writes a
checkpoint's teacher backbone in the layout that ``load_model(name, DIR)`` reads.
"""

from virchow.pretrain.config import PretrainConfig as PretrainConfig
from virchow.pretrain.config import load_config as load_config
from virchow.pretrain.export import export_checkpoint as export_checkpoint
from virchow.pretrain.train import TrainResult as TrainResult
from virchow.pretrain.train import train as train

__all__ = ["PretrainConfig", "TrainResult", "export_checkpoint", "load_config", "train"]
