"""Which Ritz values a Lanczos run wants, and when the found ones count as converged.

Split from :mod:`diagnostics.linalg.lanczos`, which uses them; the criteria are documented there.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Wanted", "eigenvalue_error_bound", "sentinels_converged"]


class Wanted:
    """Which Ritz values are wanted, in output order, and which to keep at a thick restart."""

    def __init__(self, which: str, k: int) -> None:
        self.top = k if which in ("LA", "both") else 0
        self.bottom = k if which in ("SA", "both") else 0
        self.count = self.top + self.bottom

    def select(self, theta: Tensor, top: int | None = None, bottom: int | None = None) -> Tensor:
        top = self.top if top is None else top
        bottom = self.bottom if bottom is None else bottom
        order = torch.argsort(theta)  # ascending
        m = theta.shape[0]
        top = min(top, m)
        bottom = min(bottom, m - top)
        parts = []
        if top:
            parts.append(order[m - top :].flip(0))
        if bottom:
            parts.append(order[:bottom])
        return torch.cat(parts) if parts else order[:0]

    def keep(self, theta: Tensor, count: int) -> Tensor:
        """The ``count`` Ritz values nearest the wanted end(s), wanted ones first."""
        extra = count - self.count
        if self.top and self.bottom:
            return self.select(theta, self.top + extra // 2, self.bottom + extra - extra // 2)
        if self.top:
            return self.select(theta, count, 0)
        return self.select(theta, 0, count)


def eigenvalue_error_bound(theta: Tensor, res: Tensor) -> Tensor:
    """``min(r_i, r_i^2 / gap_i)`` with ``gap_i = min_j (|theta_i - theta_j| - r_j)`` over the other Ritz values.

    Each other Ritz value ``theta_j`` has an eigenvalue within ``r_j`` of it, so ``gap_i`` is a cautious
    estimate of the distance from ``theta_i``'s eigenvalue to the rest of the spectrum seen so far.
    """
    if theta.numel() < 2:
        return res
    gap = (theta[:, None] - theta[None, :]).abs() - res[None, :]
    gap.fill_diagonal_(float("inf"))
    gap = gap.min(1).values
    quad = torch.where(gap > 0, res.square() / gap.clamp_min(1e-300), torch.full_like(res, float("inf")))
    return torch.minimum(res, quad)


def sentinels_converged(wanted: Wanted, theta: Tensor, S: Tensor, conv: Tensor, new_weight: Tensor,
                         searching: bool) -> bool:
    """After an invariant subspace: the extreme Ritz pairs of the newly explored part have converged."""
    if not searching:
        return True
    if not bool((new_weight > 0).any()):
        return False
    on_new = (S.square() * new_weight[:, None]).sum(0) > 0.5
    if not bool(on_new.any()):
        return False
    idx = on_new.nonzero().flatten()
    vals = theta[idx]
    ok = True
    if wanted.top:
        ok &= bool(conv[idx[vals.argmax()]])
    if wanted.bottom:
        ok &= bool(conv[idx[vals.argmin()]])
    return ok
