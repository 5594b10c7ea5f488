"""SSLMM: segment-graph network with alternating intra/inter-modal propagation (docs/MODEL.md).

Only ``nn.Module``s and their construction live here; what they are trained to do (the
objectives) lives with the stages in :mod:`sslmm_ray.train`.
"""

from .ema import ema_update, make_teacher
from .network import SSLMM, EarlyFusion, SSLMMOutput, build_model, resolve_backend

__all__ = [
    "SSLMM",
    "EarlyFusion",
    "SSLMMOutput",
    "build_model",
    "ema_update",
    "make_teacher",
    "resolve_backend",
]
