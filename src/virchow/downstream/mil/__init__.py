"""Multiple-instance learning on bags of tile embeddings: aggregators, training, prediction."""

from __future__ import annotations

from virchow.downstream.mil.abmil import GatedABMIL as GatedABMIL
from virchow.downstream.mil.agata import Agata as Agata
from virchow.downstream.mil.attention import MILOutput as MILOutput
from virchow.downstream.mil.model import MILCheckpoint as MILCheckpoint
from virchow.downstream.mil.model import MILModelConfig as MILModelConfig
from virchow.downstream.mil.model import build_model as build_model

__all__ = ["Agata", "GatedABMIL", "MILCheckpoint", "MILModelConfig", "MILOutput", "build_model"]
