"""Curvature operators of a model's mean loss: Hessian and generalised Gauss-Newton.

Both are linear operators (``shape``, ``dtype``, ``device``, ``@``) over the flattened selected
parameters, averaged exactly over fixed batches, with forward-over-reverse and double-backward backends.
"""

from diagnostics.curvature.base import BACKENDS, DEFAULT_CACHE_BYTES, BlockView, CurvatureOperator
from diagnostics.curvature.ggn import GGNOperator
from diagnostics.curvature.hessian import HessianOperator
from diagnostics._state import forward_mode, isolated

__all__ = [
    "HessianOperator",
    "GGNOperator",
    "CurvatureOperator",
    "BlockView",
    "BACKENDS",
    "DEFAULT_CACHE_BYTES",
    "forward_mode",
    "isolated",
]
