"""Self-distillation losses and regularisers, one per module."""

from virchow.pretrain.losses.centering import SoftmaxCentering as SoftmaxCentering
from virchow.pretrain.losses.centering import sinkhorn_knopp as sinkhorn_knopp
from virchow.pretrain.losses.dino import DINOLoss as DINOLoss
from virchow.pretrain.losses.ibot import IBOTPatchLoss as IBOTPatchLoss
from virchow.pretrain.losses.kde import KDELoss as KDELoss
from virchow.pretrain.losses.koleo import KoLeoLoss as KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KDELoss", "KoLeoLoss", "SoftmaxCentering", "sinkhorn_knopp"]
