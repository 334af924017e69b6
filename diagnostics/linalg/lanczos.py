"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos with full reorthogonalisation.

The method (Lanczos 1950; thick restart: Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2)) keeps an
orthonormal float64 basis ``Q_M`` of vectors already multiplied by ``A`` and a small "frontier" ``Q_F`` of
orthonormal vectors not yet multiplied, with the exact relation

    A Q_M = Q_M H + Q_F E,        H = Q_M^T A Q_M,   E = Q_F^T A Q_M.

For a single start vector the frontier is the one Lanczos residual vector, ``H`` is tridiagonal and this is
the textbook method; keeping the relation general lets thick restarts (``Q_M`` compressed to Ritz vectors,
``H`` diagonal) and restarts after an invariant subspace is found use the same code. Every product ``A x`` is orthogonalised
against the whole basis twice (Giraud et al. 2005: "twice is enough"), which rules out the ghost copies of
converged eigenvalues that plain Lanczos produces.

A Ritz pair ``(theta, y = Q_M s)`` has the exact residual ``||A y - theta y|| = ||E s||`` (``beta_m |s_m|`` in
the tridiagonal case); it is accepted when ``||E s|| <= tol |theta|`` (``criterion="residual"``, the default).
With ``criterion="eigenvalue"`` the test is on the eigenvalue's error instead: for a symmetric matrix a Ritz
value with residual ``r`` lies within ``min(r, r^2 / gap)`` of an eigenvalue, ``gap`` being the distance to
the rest of the spectrum (Kato-Temple; Parlett, The Symmetric Eigenvalue Problem, ch. 11). The gap is
estimated from the other Ritz values, each moved towards ``theta`` by its own residual, so a value can be
accepted to relative accuracy ``tol`` once ``r`` is about ``sqrt(tol |theta| gap)``: far fewer products for
well-separated outliers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.operator import LinearOperator, as_operator, gaussian_start, matmul64, square_dim

__all__ = ["EigenResult", "lanczos"]

_WHICH = ("LA", "SA", "both")
_CRITERIA = ("residual", "eigenvalue")
#: Steps beyond the number of wanted eigenvalues taken before convergence is accepted.
MIN_EXTRA_STEPS = 4


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs with their quality.

    Attributes:
        eigenvalues: float64 ``[k]``; ``LA`` descending, ``SA`` ascending, ``both``: the ``k`` largest
            (descending) then the ``k`` smallest (ascending), ``2k`` values.
        eigenvectors: ``[P, k]`` (or ``[P, 2k]``) in the operator's dtype, or None when not requested.
        residuals: float64, ``||A y_i - theta_i y_i||`` for each pair (exact in exact arithmetic).
        converged: bool, ``residual_i <= tol * |theta_i|`` (or the eigenvalue error estimate, with
            ``criterion="eigenvalue"``).
        num_matvecs: products with single vectors (a ``[P, K]`` product counts ``K``).
        seconds: wall time.
        settings: the arguments and what happened (restarts, stop reason).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: Tensor
    num_matvecs: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """True when every returned pair met the tolerance."""
        return bool(self.converged.all())


def _orthogonalise(W: Tensor, bases: list[Tensor], passes: int = 2) -> tuple[Tensor, list[Tensor]]:
    """Classical Gram-Schmidt of the columns of ``W`` against each orthonormal basis, ``passes`` times."""
    coeffs = [W.new_zeros(B.shape[1], W.shape[1]) for B in bases]
    for _ in range(passes):
        for i, B in enumerate(bases):
            if B.shape[1] == 0:
                continue
            c = B.T @ W
            W = W - B @ c
            coeffs[i] += c
    return W, coeffs


class _Wanted:
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


def lanczos(
    op: LinearOperator | Tensor,
    k: int = 1,
    which: str = "LA",
    tol: float = 1e-6,
    max_steps: int | None = None,
    v0: Tensor | None = None,
    seed: int = 0,
    return_eigenvectors: bool = True,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    criterion: str = "residual",
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos with full reorthogonalisation.

    ``LA`` gives the ``k`` largest *algebraic* eigenvalues (sharpness is the largest algebraic, not the
    largest magnitude), ``SA`` the ``k`` smallest, ``both`` the ``k`` largest then the ``k`` smallest.

    Args:
        op: a symmetric ``[P, P]`` LinearOperator or dense tensor.
        k: number of eigenpairs per end, ``1 <= k < P`` (``2k <= P`` for ``both``).
        which: ``"LA"``, ``"SA"`` or ``"both"``.
        tol: relative tolerance: of the residual, ``||A y - theta y|| <= tol |theta|`` (``criterion=
            "residual"``), or of the eigenvalue's estimated error, ``min(r, r^2 / gap) <= tol |theta|``
            (``criterion="eigenvalue"``, where ``gap`` is estimated from the other Ritz values).
        max_steps: basis size cap (memory ``P * max_steps`` float64 numbers); a thick restart compresses
            the basis to Ritz vectors when it is full. Default ``min(P, max(2 * nwanted + 20, 40))``.
        v0: warm start, ``[P]`` (start vector) or ``[P, K]`` (block start, e.g. the previous probe's top
            eigenvectors: Lanczos starts from the sum of an orthonormal basis of the columns' span).
        seed: seed of a private generator for the random start and restarts; the global RNG is untouched.
        return_eigenvectors: also return the Ritz vectors ``[P, k]`` in the operator's dtype.
        max_matvecs: stop before exceeding this many single-vector products.
        max_seconds: stop after the step that passes this wall time.
        criterion: ``"residual"`` (default; eigenvectors also accurate to about ``tol``) or
            ``"eigenvalue"`` (only the eigenvalues are wanted to relative accuracy ``tol``; the
            eigenvectors may be less accurate; the gap estimate can be optimistic while an eigenvalue
            next to a wanted one has not been found yet).

    Returns:
        EigenResult. On a budget stop ``converged`` is False for the pairs that did not meet ``tol``.

    Cost: one matvec per step, typically ``k`` plus a few for separated outliers; ``O(P m)`` float64 work per step for the reorthogonalisation.

    Raises:
        ConfigError: ``k`` out of range, unknown ``which``, ``max_steps`` too small, bad ``v0`` shape.

    Note:
        A single start vector sees one direction per eigenspace. Exactly or nearly invariant Krylov spaces
        trigger a restart from a fresh vector (so repeated eigenvalues are found), but a cluster of
        eigenvalues tighter than ``tol`` can be reported as one converged value with the next-lower
        eigenvalue in its place; use a tighter ``tol`` or a block ``v0`` spanning the cluster.

    Example:
        >>> res = lanczos(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), k=2, tol=1e-10)
        >>> [round(x, 8) for x in res.eigenvalues.tolist()], res.all_converged
        ([10.0, 9.0], True)
    """
    return _lanczos(op, k, which, tol, max_steps, v0, seed, return_eigenvectors, max_matvecs, max_seconds,
                    criterion=criterion)


def _lanczos(
    op: LinearOperator | Tensor,
    k: int,
    which: str,
    tol: float,
    max_steps: int | None,
    v0: Tensor | None,
    seed: int,
    return_eigenvectors: bool,
    max_matvecs: int | None,
    max_seconds: float | None,
    full_reorth: bool = True,
    criterion: str = "residual",
) -> EigenResult:
    start_time = time.perf_counter()
    A = as_operator(op)
    P = square_dim(A, "lanczos")
    if which not in _WHICH:
        raise ConfigError(f"lanczos: which must be one of {_WHICH}, got {which!r}")
    k = int(k)
    if k < 1 or k >= P:
        raise ConfigError(f"lanczos: k={k} must satisfy 1 <= k < P, the operator's dimension P={P}")
    wanted = _Wanted(which, k)
    if wanted.count > P:
        raise ConfigError(f"lanczos: which='both' needs 2*k <= P, got k={k} and P={P}")
    if not tol > 0:
        raise ConfigError(f"lanczos: tol must be positive, got {tol}")
    if criterion not in _CRITERIA:
        raise ConfigError(f"lanczos: criterion must be one of {_CRITERIA}, got {criterion!r}")
    cap = min(P, max(2 * wanted.count + 20, 40)) if max_steps is None else int(max_steps)
    if cap > P:
        cap = P
    if cap < min(P, wanted.count + 1):
        raise ConfigError(f"lanczos: max_steps={max_steps} must be at least k+1={wanted.count + 1} "
                          f"(the number of wanted eigenvalues plus one)")
    if max_matvecs is not None and max_matvecs < 1:
        raise ConfigError(f"lanczos: max_matvecs must be >= 1, got {max_matvecs}")

    device = A.device
    f64 = torch.float64
    gen_seed = int(seed)
    restarts_drawn = 0

    def random_vector() -> Tensor:
        nonlocal restarts_drawn
        restarts_drawn += 1
        return gaussian_start(P, 1, gen_seed * 7919 + restarts_drawn).to(device)

    # Frontier F (not yet multiplied), its coupling E = F^T A Q_M, basis Q_M and H = Q_M^T A Q_M.
    if v0 is None:
        start = random_vector()
        warm = None
        warm_cols = 0
    else:
        if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != P:
            raise ConfigError(f"lanczos: v0 must have shape [P] or [P, K] with P={P}, "
                              f"got {tuple(getattr(v0, 'shape', ()))}")
        block = v0[:, None] if v0.dim() == 1 else v0
        block = _orthonormal_columns(block.to(dtype=f64, device=device))
        warm = "vector" if v0.dim() == 1 or v0.shape[1] == 1 else f"block {v0.shape[1]}"
        warm_cols = block.shape[1] if block.shape[1] > 1 else 0
        # A block start begins from the sum of an orthonormal basis of its span: the Krylov space then
        # holds the whole span after about K steps and keeps growing towards the rest of the wanted
        # space. On outlier-dominated spectra this took fewer matvecs than a block Rayleigh-Ritz start.
        start = block.sum(1, keepdim=True) if block.shape[1] else block
    F = _orthonormal_columns(start)
    if F.shape[1] == 0:  # a zero warm start carries no direction
        F = _orthonormal_columns(random_vector())
    Q = torch.empty(P, cap, dtype=f64, device=device)
    m = 0
    H = torch.zeros(0, 0, dtype=f64)
    E = torch.zeros(F.shape[1], 0, dtype=f64)
    theta = torch.zeros(0, dtype=f64)
    S = torch.zeros(0, 0, dtype=f64)
    res_all = torch.zeros(0, dtype=f64)
    conv_all = torch.zeros(0, dtype=torch.bool)
    num_matvecs = 0
    restarts = 0
    hard_cap = max_matvecs if max_matvecs is not None else max(50 * cap, 20 * P if P < 1000 else 0, 2000)
    scale = 0.0  # running estimate of ||A|| for breakdown tests
    stop = "converged"
    # Single-vector Krylov spaces find the second copy of a (nearly) repeated eigenvalue only after the
    # first has converged, so a loose tol could accept a wrong k-th value: never stop before k+4 steps
    # from a random start. A block warm start of at least k vectors already spans the copies it knew of.
    extra = 1 if warm_cols >= wanted.count else MIN_EXTRA_STEPS
    min_steps = max(1, min(P - 1, max(wanted.count, warm_cols) + extra))
    # Weight of each basis column on the part of the space explored after the last invariant subspace.
    new_weight = torch.zeros(cap, dtype=f64)
    searching_complement = False
    near_invariant = False

    while True:
        # Converged or the whole space explored: done.
        if m == P:
            stop = "invariant subspace"
            break
        if near_invariant and m < P:
            # The newest Lanczos vector is tiny: the Krylov space is invariant up to ~1e-8 and would
            # hide further copies of eigenvalues it holds. Keep that vector in the frontier (so that
            # residuals stay exact) and continue from a fresh random vector, multiplied next (when no
            # direction is left, the tiny vector itself is multiplied next).
            searching_complement = True
            r0 = random_vector()
            r, _ = _orthogonalise(r0, [Q[:, :m], F])
            # Nothing left of it (the basis and frontier span the space): no new direction.
            r = _orthonormal_columns(r) if float(r.norm()) > 1e-8 * float(r0.norm()) else r[:, :0]
            F = torch.cat([F, r], 1)
            E = torch.cat([E, torch.zeros(r.shape[1], m, dtype=f64)], 0)
        near_invariant = False
        if m >= min_steps and F.shape[1] > 0:
            idx = wanted.select(theta)
            sentinels = _sentinels_converged(wanted, theta, S, conv_all, new_weight[:m], searching_complement)
            if bool(conv_all[idx].all()) and sentinels:
                stop = "converged"
                break
        if F.shape[1] == 0:
            # The Krylov space became invariant. Its Ritz values are exact, but eigenvalues outside it
            # (e.g. further copies of a repeated eigenvalue) are invisible to it: continue from a fresh
            # random vector orthogonal to the basis, and stop only once that new sequence's own extreme
            # Ritz values have converged too (they then bound what the complement holds).
            searching_complement = True
            r0 = random_vector()
            r, _ = _orthogonalise(r0, [Q[:, :m]])
            F = _orthonormal_columns(r) if float(r.norm()) > 1e-8 * float(r0.norm()) else r[:, :0]
            E = torch.zeros(F.shape[1], m, dtype=f64)
            if F.shape[1] == 0:
                stop = "invariant subspace"
                break
        s = 1  # one product per step: the newest frontier vector (the Lanczos vector)
        if num_matvecs + s > hard_cap:
            stop = "max_matvecs" if max_matvecs is not None else "iteration cap"
            break
        if max_seconds is not None and time.perf_counter() - start_time > max_seconds:
            stop = "max_seconds"
            break
        if m + s > cap:
            # Thick restart: keep the Ritz vectors nearest the wanted end(s) and the frontier.
            keep_n = min(m, cap - s, wanted.count + max(1, (cap - wanted.count) // 2))
            keep = wanted.keep(theta, keep_n)
            Sk = S[:, keep]
            Q[:, :keep_n] = Q[:, :m] @ Sk.to(device)
            m = keep_n
            H = torch.diag(theta[keep])
            E = E @ Sk
            theta, S = theta[keep], torch.eye(keep_n, dtype=f64)
            res_all, conv_all = res_all[keep], conv_all[keep]
            new_weight[:keep_n] = (Sk.square() * new_weight[: Sk.shape[0], None]).sum(0)
            restarts += 1
        # The newest frontier vector is the Lanczos vector; older ones (tiny remainders) are only kept.
        X, F_rest = F[:, -s:], F[:, :-s]
        E_x, E_rest = E[-s:], E[:-s]

        W = matmul64(A, X)
        num_matvecs += s
        w_norm = W.norm(dim=0)
        scale = max(scale, float(w_norm.max()))

        Q[:, m : m + s] = X
        new_weight[m : m + s] = 1.0 if searching_complement else 0.0
        if full_reorth:
            W, (c_m, c_f) = _orthogonalise(W, [Q[:, : m + s], F_rest])
        else:
            # Plain three-term recurrence (for tests that show why reorthogonalisation is needed).
            lo = max(0, m - 1)
            W, (c_local,) = _orthogonalise(W, [Q[:, lo : m + s]], passes=1)
            c_m = torch.zeros(m + s, s, dtype=f64, device=device)
            c_m[lo:] = c_local
            c_f = torch.zeros(F_rest.shape[1], s, dtype=f64, device=device)
        c_m, c_f = c_m.cpu(), c_f.cpu()
        h_xx = c_m[m : m + s]
        h_xx = 0.5 * (h_xx + h_xx.T)
        H_new = torch.zeros(m + s, m + s, dtype=f64)
        H_new[:m, :m] = H
        if full_reorth:
            H_new[m:, :m] = E_x
            H_new[:m, m:] = E_x.T
        else:
            H_new[:m, m:] = c_m[:m]
            H_new[m:, :m] = c_m[:m].T
        H_new[m:, m:] = h_xx
        H = H_new

        # New frontier directions from the remainder of A X; a negligible remainder means invariance.
        rem = W.norm(dim=0)
        keep_cols = rem > 1e-12 * max(scale, 1e-300)
        near_invariant = bool((rem <= 1e-8 * max(scale, 1e-300)).all())
        W = W[:, keep_cols]
        if W.shape[1]:
            Qw, Rw = torch.linalg.qr(W)
            Rw_full = torch.zeros(W.shape[1], s, dtype=f64)
            Rw_full[:, keep_cols.cpu()] = Rw.cpu()
        else:
            Qw = W
            Rw_full = torch.zeros(0, s, dtype=f64)
        E_new = torch.zeros(F_rest.shape[1] + Qw.shape[1], m + s, dtype=f64)
        E_new[: F_rest.shape[1], :m] = E_rest
        E_new[: F_rest.shape[1], m:] = c_f
        E_new[F_rest.shape[1] :, m:] = Rw_full
        F = torch.cat([F_rest, Qw], 1)
        E = E_new
        m += s

        # Rayleigh-Ritz on the multiplied basis and exact residual norms ||E s_i||.
        theta, S = torch.linalg.eigh(H)
        res_all = (E @ S).norm(dim=0) if E.shape[0] else torch.zeros(m, dtype=f64)
        floor = 1e-10 * float(theta.abs().max()) if m else 0.0
        bound = res_all if criterion == "residual" else _eigenvalue_error_bound(theta, res_all)
        conv_all = bound <= tol * torch.clamp(theta.abs(), min=floor)

    idx = wanted.select(theta)
    n_found = idx.numel()
    eigenvalues = torch.full((wanted.count,), float("nan"), dtype=f64)
    residuals = torch.full((wanted.count,), float("inf"), dtype=f64)
    converged = torch.zeros(wanted.count, dtype=torch.bool)
    vectors = None
    if return_eigenvectors:
        vectors = torch.zeros(P, wanted.count, dtype=A.dtype, device=device)
    # Place found pairs: top part first, bottom part after (same layout even when m < count).
    n_top = min(wanted.top, n_found)
    slots = list(range(n_top)) + [wanted.top + j for j in range(n_found - n_top)]
    if n_found:
        slots_t = torch.tensor(slots, dtype=torch.long)
        eigenvalues[slots_t] = theta[idx]
        residuals[slots_t] = res_all[idx]
        converged[slots_t] = conv_all[idx]
        if vectors is not None:
            vectors[:, slots_t.to(device)] = (Q[:, :m] @ S[:, idx].to(device)).to(A.dtype)
    settings = {
        "k": k, "which": which, "tol": tol, "max_steps": cap, "seed": seed, "warm_start": warm,
        "max_matvecs": max_matvecs, "max_seconds": max_seconds, "restarts": restarts, "stop": stop,
        "reorthogonalization": "full" if full_reorth else "none", "criterion": criterion,
    }
    return EigenResult(
        eigenvalues=eigenvalues, eigenvectors=vectors, residuals=residuals, converged=converged,
        num_matvecs=num_matvecs, seconds=time.perf_counter() - start_time, settings=settings,
    )


def _eigenvalue_error_bound(theta: Tensor, res: Tensor) -> Tensor:
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


def _sentinels_converged(wanted: _Wanted, theta: Tensor, S: Tensor, conv: Tensor, new_weight: Tensor,
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


def _orthonormal_columns(V: Tensor, rtol: float = 1e-10) -> Tensor:
    """An orthonormal basis of the span of ``V``'s columns (dependent columns dropped)."""
    norms = V.norm(dim=0)
    if norms.numel() == 0 or float(norms.max()) == 0.0:
        return V[:, :0]
    V = V[:, norms > rtol * norms.max()]
    V, _ = _orthogonalise(V, [], passes=0)
    Qv, R = torch.linalg.qr(V)
    d = R.diagonal().abs()
    good = d > rtol * d.max()
    Qv = Qv[:, good]
    # A second pass guards against loss of orthogonality in ill-conditioned blocks.
    Qv, _ = torch.linalg.qr(Qv)
    return Qv
