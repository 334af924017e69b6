"""A LinearOperator wrapper that turns a non-finite product into an error, and counts products."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FiniteChecked", "NonFiniteProductError"]


class NonFiniteProductError(FloatingPointError):
    """An operator product (or a vector it was built from) contained NaN or inf: the estimate is failed."""


class FiniteChecked:
    """``op`` with every product checked for NaN/inf; raises :class:`NonFiniteProductError` on one.

    Lanczos on a NaN product would either crash in ``eigh`` or return NaN "eigenvalues"; checking each
    product turns both into an honest failure. ``num_matvecs`` counts the columns multiplied so far, so
    that a caller can report the cost of an estimate that stopped midway.

    Args:
        op: anything with ``shape``, ``dtype``, ``device`` and ``@`` (a LinearOperator or a dense Tensor).

    Cost: one ``isfinite`` reduction and one host sync per product, negligible next to a curvature product.

    Example:
        >>> op = FiniteChecked(torch.eye(2))
        >>> (op @ torch.ones(2)).tolist(), op.num_matvecs
        ([1.0, 1.0], 1)
    """

    def __init__(self, op: Any) -> None:
        self.op = op
        self.shape = op.shape
        self.dtype = op.dtype
        self.device = op.device
        self.num_matvecs = 0

    def __matmul__(self, V: Tensor) -> Tensor:
        out = self.op @ V
        self.num_matvecs += 1 if V.dim() == 1 else int(V.shape[1])
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteProductError(
                "non-finite curvature-vector product (NaN/inf in the loss, the parameters or their gradients "
                "on the probe data)"
            )
        return out
