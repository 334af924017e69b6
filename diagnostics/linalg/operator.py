"""A minimal linear-operator protocol and the dense and scaled operators built on it.

Shape vocabulary for all of :mod:`diagnostics.linalg`: ``N`` batch, ``P`` parameters (the operator's
dimension), ``K`` vectors; sets of vectors are columns of a ``[P, K]`` tensor.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from diagnostics.errors import ConfigError

__all__ = ["LinearOperator", "DenseOperator", "ScaledOperator", "as_operator", "rademacher_probes"]


@runtime_checkable
class LinearOperator(Protocol):
    """Anything with a shape, a dtype, a device and a product with ``[P]`` or ``[P, K]`` tensors.

    ``op @ V`` returns ``[P]`` for ``V`` of shape ``[P]`` and ``[P, K]`` for ``[P, K]``; implementations
    batch the ``K`` columns where they can. One column of a product counts as one matvec.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, V: Tensor) -> Tensor: ...


class DenseOperator:
    """A dense matrix seen as a :class:`LinearOperator`; counts its matvecs in ``num_matvecs``.

    Args:
        matrix: a ``[P, Q]`` tensor.

    Example:
        >>> op = DenseOperator(torch.eye(3))
        >>> (op @ torch.ones(3, 2)).sum().item(), op.num_matvecs
        (6.0, 2)
    """

    def __init__(self, matrix: Tensor) -> None:
        if not isinstance(matrix, Tensor) or matrix.dim() != 2:
            raise ConfigError(f"DenseOperator needs a 2-D tensor, got {type(matrix).__name__} "
                              f"with shape {getattr(matrix, 'shape', None)}")
        self.matrix = matrix
        self.shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def __matmul__(self, V: Tensor) -> Tensor:
        V = V.to(dtype=self.dtype, device=self.device)
        self.num_matvecs += 1 if V.dim() == 1 else int(V.shape[1])
        return self.matrix @ V

    def __repr__(self) -> str:
        return f"DenseOperator(shape={self.shape}, dtype={self.dtype})"


class ScaledOperator:
    """``diag(s) @ op @ diag(s)``: a symmetric rescaling, e.g. Adam's ``P^{-1/2} H P^{-1/2}``.

    Args:
        op: a square operator or dense tensor of dimension ``P``.
        s: the ``[P]`` scaling vector.

    Cost: one product with ``op`` per product.

    Example:
        >>> S = ScaledOperator(torch.eye(2, dtype=torch.float64), torch.tensor([2.0, 3.0]))
        >>> (S @ torch.ones(2, dtype=torch.float64)).tolist()
        [4.0, 9.0]
    """

    def __init__(self, op: LinearOperator | Tensor, s: Tensor) -> None:
        self.op = as_operator(op)
        if self.op.shape[0] != self.op.shape[1]:
            raise ConfigError(f"ScaledOperator needs a square operator, got shape {self.op.shape}")
        if s.dim() != 1 or s.shape[0] != self.op.shape[0]:
            raise ConfigError(f"ScaledOperator scaling s must have shape [{self.op.shape[0]}], "
                              f"got {tuple(s.shape)}")
        self.shape = self.op.shape
        self.dtype = self.op.dtype
        self.device = self.op.device
        self.s = s.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, V: Tensor) -> Tensor:
        V = V.to(dtype=self.dtype, device=self.device)
        s = self.s if V.dim() == 1 else self.s[:, None]
        return s * (self.op @ (s * V))

    @property
    def num_matvecs(self) -> int:
        return int(getattr(self.op, "num_matvecs", 0))

    def __repr__(self) -> str:
        return f"ScaledOperator({self.op!r})"


def as_operator(x: LinearOperator | Tensor) -> LinearOperator:
    """Return ``x`` as a :class:`LinearOperator`: a dense tensor is wrapped in :class:`DenseOperator`.

    Raises:
        ConfigError: ``x`` is neither a 2-D tensor nor an object with ``shape``, ``dtype``, ``device``, ``@``.
    """
    if isinstance(x, Tensor):
        return DenseOperator(x)
    if isinstance(x, LinearOperator):
        return x
    raise ConfigError(f"expected a 2-D tensor or a LinearOperator (shape, dtype, device, @), "
                      f"got {type(x).__name__}")


def square_dim(op: LinearOperator, what: str) -> int:
    """The dimension ``P`` of a square operator; ConfigError naming ``what`` otherwise."""
    p, q = int(op.shape[0]), int(op.shape[1])
    if p != q:
        raise ConfigError(f"{what} needs a square operator, got shape ({p}, {q})")
    if p < 1:
        raise ConfigError(f"{what} needs a non-empty operator, got shape ({p}, {q})")
    return p


def matmul64(op: LinearOperator, V: Tensor) -> Tensor:
    """``op @ V`` with the product in the operator's dtype and the result in float64."""
    return (op @ V.to(dtype=op.dtype, device=op.device)).to(torch.float64)


def rademacher_probes(dim: int, start: int, count: int, seed: int, device: torch.device | None = None) -> Tensor:
    """Columns ``start .. start+count-1`` of the seed's Rademacher probe sequence, as float64 ``[dim, count]``.

    Probe ``j`` depends only on ``(seed, j)``, never on how probes are grouped in blocks, so every
    estimator given the same seed sees the same probes (Hutchinson and SLQ in particular). A private
    ``torch.Generator`` is used; the global RNG is untouched.
    """
    out = torch.empty(dim, count, dtype=torch.float64)
    gen = torch.Generator()
    for c in range(count):
        # One generator state per probe index: a stable, grouping-independent stream.
        gen.manual_seed((int(seed) * 1_000_003 + start + c) % (2**63 - 1))
        bits = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8)
        out[:, c] = bits.to(torch.float64).mul_(2.0).sub_(1.0)
    return out if device is None else out.to(device)


def gaussian_start(dim: int, count: int, seed: int) -> Tensor:
    """A float64 ``[dim, count]`` Gaussian block from a private generator seeded with ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return torch.randn(dim, count, generator=gen, dtype=torch.float64)
