"""Angles and overlaps between subspaces given by the columns of ``[P, K]`` matrices."""

from __future__ import annotations

import torch
from torch import Tensor

from diagnostics.errors import ConfigError

__all__ = ["principal_angles", "subspace_overlap", "subspace_fraction"]


def _basis(U: Tensor, name: str) -> Tensor:
    """An orthonormal basis (float64) of the column span of ``U`` (``[P]`` is one column)."""
    if not isinstance(U, Tensor) or U.dim() not in (1, 2):
        raise ConfigError(f"{name} must be a [P] or [P, K] tensor, got shape {tuple(getattr(U, 'shape', ()))}")
    U = U.to(torch.float64)
    if U.dim() == 1:
        U = U[:, None]
    if U.shape[1] == 0 or U.shape[0] == 0:
        raise ConfigError(f"{name} has no columns or rows: shape {tuple(U.shape)}")
    Q, _ = torch.linalg.qr(U)
    return Q


def _pair(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    QU, QV = _basis(U, "U"), _basis(V, "V")
    if QU.shape[0] != QV.shape[0]:
        raise ConfigError(f"U and V must have the same number of rows P, got {QU.shape[0]} and {QV.shape[0]}")
    return QU, QV


def principal_angles(U: Tensor, V: Tensor) -> Tensor:
    """Principal angles between ``span(U)`` and ``span(V)``, ascending, in radians (float64 ``[min(p, q)]``).

    Cosines are the singular values of ``Q_U^T Q_V`` (Björck & Golub 1973); small angles come from the
    sines, the singular values of ``Q_V - Q_U Q_U^T Q_V`` (Knyazev & Argentati 2002), which keeps them
    accurate below ~1e-8 where the arccos of a cosine near 1 is not. Columns need not be orthonormal.

    Cost: two QR factorisations and two SVDs of size ``P x max(p, q)``.

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> [round(a, 6) for a in principal_angles(e[:, :2], e[:, 1:]).tolist()]
        [0.0, 1.570796]
    """
    QU, QV = _pair(U, V)
    if QU.shape[1] < QV.shape[1]:
        QU, QV = QV, QU  # project the smaller basis out of the larger one
    cos = torch.linalg.svdvals(QU.T @ QV).clamp(max=1.0)  # descending
    sin = torch.linalg.svdvals(QV - QU @ (QU.T @ QV)).clamp(max=1.0).flip(0)  # ascending
    from_cos = torch.arccos(cos)
    from_sin = torch.arcsin(sin)
    return torch.where(sin < 0.5**0.5, from_sin, from_cos)


def subspace_overlap(U: Tensor, V: Tensor) -> float:
    """``(1/k) tr(P_U P_V) = (1/k) ||Q_U^T Q_V||_F^2`` with ``k = max(dim U, dim V)``.

    1 for equal subspaces, 0 for orthogonal ones, ``j/k`` when ``j`` directions are shared; equal to the
    mean squared cosine of the principal angles when the dimensions agree.

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> subspace_overlap(e[:, :2], e[:, 1:3])
        0.5
    """
    QU, QV = _pair(U, V)
    k = max(QU.shape[1], QV.shape[1])
    return float((QU.T @ QV).square().sum() / k)


def subspace_fraction(g: Tensor, V: Tensor) -> float:
    """Fraction of ``g``'s squared norm inside ``span(V)``: ``||P_V g||^2 / ||g||^2`` (0 for ``g = 0``).

    ``V`` is orthonormalised first, so any spanning set works.

    Example:
        >>> e = torch.eye(3, dtype=torch.float64)
        >>> subspace_fraction(torch.tensor([1.0, 1.0, 0.0]), e[:, :1])
        0.5
    """
    if not isinstance(g, Tensor) or g.dim() != 1:
        raise ConfigError(f"g must be a 1-D [P] tensor, got shape {tuple(getattr(g, 'shape', ()))}")
    QV = _basis(V, "V")
    if QV.shape[0] != g.shape[0]:
        raise ConfigError(f"g has {g.shape[0]} entries but V has {QV.shape[0]} rows")
    g = g.to(torch.float64)
    total = float(g.square().sum())
    if total == 0.0:
        return 0.0
    return float((QV.T @ g).square().sum()) / total
