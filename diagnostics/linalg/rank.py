"""Effective rank, stable rank, nuclear norm and the alpha-ReQ decay exponent."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, DataError

__all__ = ["effective_rank", "stable_rank", "nuclear_norm", "alpha_req"]

_VARIANTS = ("sigma", "covariance")


def _matrix(W: Tensor, name: str) -> Tensor:
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"{name} needs a 2-D tensor, got shape {tuple(getattr(W, 'shape', ()))}")
    if W.numel() == 0:
        raise DataError(f"{name} got an empty matrix of shape {tuple(W.shape)}")
    W = W.detach().to(torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise DataError(f"{name} got a matrix with non-finite entries")
    return W


def _entropy_rank(values: Tensor, eps: float) -> float:
    total = float(values.sum())
    if total <= 0.0:
        return 0.0
    p = values / total + eps
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(x: Tensor, *, variant: str = "sigma", eps: float = 1e-12) -> float:
    """Effective rank ``exp(-sum_k p_k log p_k)`` (Roy & Vetterli 2007; RankMe, Garrido et al. 2023).

    ``variant="sigma"`` (default): ``p_k = sigma_k / sum(sigma) + eps`` over the singular values of ``x``.
    ``variant="covariance"``: over the eigenvalues of the centred covariance of the rows of ``x``
    (``[N, D]``, samples as rows), i.e. ``sigma_k^2`` of the column-centred matrix; numbers differ a lot
    from the sigma variant, so record which one was used.

    Args:
        x: a matrix, or 1-D singular values (for ``"covariance"``: singular values of the centred matrix).
        variant: ``"sigma"`` or ``"covariance"``.
        eps: added to each ``p_k`` (RankMe's guard against ``log 0``).

    Returns:
        The effective rank in ``[1, min(shape)]`` (0.0 for a zero matrix).

    Cost: one SVD (singular values only).

    Example:
        >>> round(effective_rank(torch.tensor([3.0, 2.0, 1.0, 0.0])), 4)
        2.7495
        >>> round(effective_rank(torch.eye(5)), 6)
        5.0
    """
    if variant not in _VARIANTS:
        raise ConfigError(f"effective_rank: variant must be one of {_VARIANTS}, got {variant!r}")
    if isinstance(x, Tensor) and x.dim() == 1:
        s = x.detach().to(torch.float64)
        if bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
            raise DataError("effective_rank: singular values must be finite and non-negative")
    else:
        X = _matrix(x, "effective_rank")
        if variant == "covariance":
            X = X - X.mean(0, keepdim=True)
        s = torch.linalg.svdvals(X)
    values = s.square() if variant == "covariance" else s
    return _entropy_rank(values, eps)


def stable_rank(W: Tensor) -> float:
    """Stable rank ``||W||_F^2 / ||W||_2^2`` (0.0 for a zero matrix).

    Cost: one SVD (singular values only).

    Example:
        >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0])))
        1.25
    """
    s = torch.linalg.svdvals(_matrix(W, "stable_rank"))
    top = float(s[0])
    return 0.0 if top == 0.0 else float(s.square().sum()) / top**2


def nuclear_norm(W: Tensor) -> float:
    """Nuclear norm ``sum_k sigma_k``.

    Example:
        >>> nuclear_norm(torch.diag(torch.tensor([2.0, -1.0])))
        3.0
    """
    return float(torch.linalg.svdvals(_matrix(W, "nuclear_norm")).sum())


def alpha_req(X: Tensor, first: int = 11, last: int = 100) -> float:
    """alpha-ReQ (Agrawal et al. 2022): decay exponent ``alpha`` of ``lambda_i ~ i^(-alpha)``.

    ``lambda_i`` are the eigenvalues of the centred covariance of the rows of ``X`` (``[N, D]``), fitted by
    weighted least squares of ``log lambda_i`` on ``log i`` with weights ``1/i`` over ranks
    ``first..last`` (1-based, 11..100 by default; cut to the positive eigenvalues available).

    Raises:
        DataError: fewer than two positive eigenvalues in the rank window (needs ``min(N-1, D) >= first+1``).

    Example:
        >>> i = torch.arange(1, 201, dtype=torch.float64)
        >>> X = torch.diag(i ** -1.0) * 200 ** 0.5  # columns with variances ~ i^-2: alpha = 2
        >>> round(alpha_req(torch.cat([X, -X])), 6)
        2.0
    """
    M = _matrix(X, "alpha_req")
    M = M - M.mean(0, keepdim=True)
    lam = torch.linalg.svdvals(M).square() / max(M.shape[0] - 1, 1)
    lam = lam[lam > lam[0] * 1e-12] if float(lam[0]) > 0 else lam[:0]
    hi = min(last, lam.shape[0])
    if hi < first + 1:
        raise DataError(f"alpha_req needs at least {first + 1} positive covariance eigenvalues, "
                        f"got {lam.shape[0]} from a matrix of shape {tuple(X.shape)}")
    ranks = torch.arange(first, hi + 1, dtype=torch.float64)
    y = lam[ranks.long() - 1].log()
    x = ranks.log()
    w = 1.0 / ranks
    xm = (w * x).sum() / w.sum()
    ym = (w * y).sum() / w.sum()
    slope = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm).square()).sum()
    return float(-slope)
