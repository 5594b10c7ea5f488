"""SSLMM: segment-graph network with alternating intra/inter-modal propagation (docs/MODEL.md)."""

from .ema import ema_update, make_teacher
from .network import SSLMM, EarlyFusion, SSLMMOutput, build_model, resolve_backend
from .objectives import (
    drop_modalities,
    finetune_loss,
    pretrain_loss,
    pseudo_labels,
    rampup,
    random_hide,
)

__all__ = [
    "SSLMM",
    "EarlyFusion",
    "SSLMMOutput",
    "build_model",
    "drop_modalities",
    "ema_update",
    "finetune_loss",
    "make_teacher",
    "pretrain_loss",
    "pseudo_labels",
    "random_hide",
    "rampup",
    "resolve_backend",
]
