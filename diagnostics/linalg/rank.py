"""Effective rank, stable rank, nuclear norm and the alpha-ReQ decay exponent."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, DataError

__all__ = ["effective_rank", "stable_rank", "singular_values", "nuclear_norm", "alpha_req", "AlphaReqFit"]

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


def singular_values(W: Tensor, name: str = "singular_values") -> Tensor:
    """The singular values of a matrix in float64, descending, checked (2-D, not empty, finite; ``name``
    in the error). One SVD serves :func:`effective_rank` and :func:`stable_rank`, which take them too.

    Cost: one SVD (singular values only).
    """
    return torch.linalg.svdvals(_matrix(W, name))


def stable_rank(W: Tensor) -> float:
    """Stable rank ``||W||_F^2 / ||W||_2^2`` (0.0 for a zero matrix); ``W`` a matrix or its 1-D singular
    values (descending, as :func:`singular_values` gives them).

    Cost: one SVD (singular values only), none from singular values.

    Example:
        >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0])))
        1.25
    """
    if isinstance(W, Tensor) and W.dim() == 1:
        s = W.detach().to(torch.float64)
        if s.numel() == 0 or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
            raise DataError("stable_rank: singular values must be finite, non-negative and not empty")
        s = s.sort(descending=True).values
    else:
        s = singular_values(W, "stable_rank")
    top = float(s[0])
    return 0.0 if top == 0.0 else float(s.square().sum()) / top**2


def nuclear_norm(W: Tensor) -> float:
    """Nuclear norm ``sum_k sigma_k``.

    Example:
        >>> nuclear_norm(torch.diag(torch.tensor([2.0, -1.0])))
        3.0
    """
    return float(torch.linalg.svdvals(_matrix(W, "nuclear_norm")).sum())


@dataclass(frozen=True)
class AlphaReqFit:
    """An alpha-ReQ fit and what it was fitted on; ``alpha`` is ``nan`` when there was too little to fit.

    Attributes:
        alpha: the decay exponent, or ``nan`` (then ``reason`` says why).
        first, last: the 1-based ranks actually fitted (``0, 0`` when nothing was fitted).
        num_ranks: ``last - first + 1`` (0 when nothing was fitted).
        r2: weighted coefficient of determination of the log-log fit (``nan`` when not fitted): how well
            one power law describes the window.
        num_samples, num_features: the shape of ``X``; ``num_positive`` the eigenvalues above
            ``1e-12 * lambda_1``.
        reason: ``None`` for a fit, else the reason there is none.

    ``float(fit)`` is ``fit.alpha``.
    """

    alpha: float
    first: int
    last: int
    num_ranks: int
    r2: float
    num_samples: int
    num_features: int
    num_positive: int
    reason: str | None = None

    def __float__(self) -> float:
        return self.alpha

    @property
    def ok(self) -> bool:
        """True when ``alpha`` was fitted."""
        return self.reason is None


def alpha_req(X: Tensor, first: int = 11, last: int = 100, *, min_ranks: int = 20,
              edge_fraction: float = 0.5) -> AlphaReqFit:
    """alpha-ReQ (Agrawal et al. 2022): decay exponent ``alpha`` of ``lambda_i ~ i^(-alpha)``.

    ``lambda_i`` are the eigenvalues of the centred covariance of the rows of ``X`` (``[N, D]``: N samples,
    D features), fitted by weighted least squares of ``log lambda_i`` on ``log i`` with weights ``1/i``
    over ranks ``first..hi``, ``hi = min(last, floor(edge_fraction * min(N - 1, D)), num_positive)``
    (11..100 by default). The window stops at half the available spectrum because finite samples distort
    the smallest sample eigenvalues most (they fall towards 0 at the Marchenko-Pastur edge, steepening the
    fit): with Gaussian features of spectrum ``i^-1`` and D = 64, fitting up to rank 64 reads 1.09 at
    N = 1024 and 1.33 at N = 256, stopping at rank 32 reads 1.02 and 1.11.

    Below ``min_ranks`` fitted ranks (20: at least 60 features and 61 samples with the defaults) the result
    is ``nan`` with the reason, never a number from a handful of points. Even above it the estimate is
    biased unless N >> D, most for flat spectra: Gaussian features with ``alpha = 1``, D = 128 read 1.09
    at N = 2D and 1.01 at N = 8D; with ``alpha = 0.5`` they read 0.60 at N = 4D and 0.53 at N = 8D
    (``tests/linalg/test_linalg_subspace_rank.py`` holds the finite-sample test).

    Args:
        X: ``[N, D]`` samples as rows.
        first, last: the rank window before cutting (1-based, inclusive).
        min_ranks: the fewest ranks a fit may use.
        edge_fraction: the window ends at this fraction of ``min(N - 1, D)``.

    Returns:
        :class:`AlphaReqFit` (``float()`` of it is alpha). Cost: one SVD of the centred ``X``,
        ``O(N D min(N, D))``.

    Example:
        >>> i = torch.arange(1, 201, dtype=torch.float64)
        >>> X = torch.diag(i ** -1.0) * 200 ** 0.5  # columns with variances ~ i^-2: alpha = 2
        >>> fit = alpha_req(torch.cat([X, -X]))
        >>> round(fit.alpha, 6), (fit.first, fit.last)
        (2.0, (11, 100))
        >>> alpha_req(torch.randn(40, 30)).reason
        'alpha_req fits ranks 11..15 of a [40, 30] matrix (half of min(N-1, D) = 30 available ranks): 5 ranks, fewer than min_ranks = 20'
    """
    if not (isinstance(first, int) and isinstance(last, int) and 1 <= first < last):
        raise ConfigError(f"alpha_req: need integers 1 <= first < last, got first={first!r}, last={last!r}")
    if not (isinstance(min_ranks, int) and min_ranks >= 2):
        raise ConfigError(f"alpha_req: min_ranks must be an integer >= 2, got {min_ranks!r}")
    if not (0.0 < edge_fraction <= 1.0):
        raise ConfigError(f"alpha_req: edge_fraction must be in (0, 1], got {edge_fraction!r}")
    M = _matrix(X, "alpha_req")
    n, d = M.shape
    M = M - M.mean(0, keepdim=True)
    lam = torch.linalg.svdvals(M).square() / max(n - 1, 1)
    positive = int((lam > lam[0] * 1e-12).sum()) if float(lam[0]) > 0 else 0
    available = min(n - 1, d)
    hi = min(last, int(edge_fraction * available), positive)
    num = hi - first + 1

    def empty(reason: str) -> AlphaReqFit:
        return AlphaReqFit(math.nan, 0, 0, 0, math.nan, n, d, positive, reason)

    if positive < available and hi == positive:
        where = f"{positive} positive eigenvalues of {available} (a rank-deficient matrix)"
    else:
        where = f"{'half' if edge_fraction == 0.5 else edge_fraction} of min(N-1, D) = {available} available ranks"
    if num < min_ranks:
        return empty(f"alpha_req fits ranks {first}..{hi} of a [{n}, {d}] matrix ({where}): "
                     f"{max(num, 0)} ranks, fewer than min_ranks = {min_ranks}")
    ranks = torch.arange(first, hi + 1, dtype=torch.float64)
    y = lam[ranks.long() - 1].log()
    x = ranks.log()
    w = 1.0 / ranks
    xm = (w * x).sum() / w.sum()
    ym = (w * y).sum() / w.sum()
    slope = (w * (x - xm) * (y - ym)).sum() / (w * (x - xm).square()).sum()
    resid = y - ym - slope * (x - xm)
    ss_tot = float((w * (y - ym).square()).sum())
    r2 = 1.0 - float((w * resid.square()).sum()) / ss_tot if ss_tot > 0 else math.nan
    return AlphaReqFit(float(-slope), first, hi, num, r2, n, d, positive, None)
