"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos on a semi-orthogonal basis.

The method (Lanczos 1950; thick restart: Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2)) keeps an
orthonormal basis ``Q_M`` of vectors already multiplied by ``A`` and a small "frontier" ``Q_F`` of
orthonormal vectors not yet multiplied, with the exact relation

    A Q_M = Q_M H + Q_F E,        H = Q_M^T A Q_M,   E = Q_F^T A Q_M.

For a single start vector the frontier is the one Lanczos residual vector, ``H`` is tridiagonal and this is
the textbook method; keeping the relation general lets thick restarts (``Q_M`` compressed to Ritz vectors,
``H`` diagonal) and restarts after an invariant subspace is found use the same code.

The basis (one preallocated ``[m, P]`` buffer) and the frontier are in the operator's dtype and on its
device unless told otherwise; only ``H``, ``E`` and the Ritz problem are float64 (CPU). Each product
``w = A x`` first loses its known components (``q_j^T A x = E_xj`` by symmetry, and ``x^T A x``); then its
coefficients on the whole basis are computed (one read of the basis). When the largest is below
``tau`` times the remainder's norm, the remainder is taken as it is, with ``tau = min(sqrt(eps),
max(0.01 sqrt(eps), 2 eps sqrt(P)))`` (eps of the basis dtype; ``eps sqrt(P)`` is the rounding noise of a
length-P dot product, below which a coefficient cannot be told from noise and subtracting it does not
make the vector more orthogonal: with a float32 basis at P = 1.1M they were 5e-5 to 1.1e-4 at every step,
against eps sqrt(P) = 1.3e-4). The
basis stays semi-orthogonal, which keeps the Ritz values as accurate as full orthogonality does and rules
out the ghost copies of converged eigenvalues that plain Lanczos produces (Simon 1984, Math. Comp. 42),
and the Lanczos relation stays exact because those coefficients are not folded into ``H`` either.
Otherwise the remainder is orthogonalised by classical Gram-Schmidt, repeated only while a pass removes
most of the vector (DGKS test: Daniel et al. 1976; Giraud et al. 2005, "twice is enough"). The usual step
reads the basis once; a step that orthogonalises reads it twice.

A Ritz pair ``(theta, y = Q_M s)`` has the exact residual ``||A y - theta y|| = ||E s||`` (``beta_m |s_m|`` in
the tridiagonal case) when the products are exact; since each product is rounded in the operator's dtype,
the residual used and reported is ``max(||E s||, eps ||A||)`` (``||A||`` estimated by the largest ``||A x||``
seen or ``|theta|`` found). A pair is accepted when that is ``<= tol |theta|`` (``criterion="residual"``,
the default).
With ``criterion="eigenvalue"`` the test is on the eigenvalue's error instead: for a symmetric matrix a Ritz
value with residual ``r`` lies within ``min(r, r^2 / gap)`` of an eigenvalue, ``gap`` being the distance to
the rest of the spectrum (Kato-Temple; Parlett, The Symmetric Eigenvalue Problem, ch. 11). The gap is
estimated from the other Ritz values, each moved towards ``theta`` by its own residual, so a value can be
accepted to relative accuracy ``tol`` once ``r`` is about ``sqrt(tol |theta| gap)``: far fewer products for
well-separated outliers. That estimate has the same floor ``eps ||A||`` as the residual.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.lanczos_basis import (
    DEFAULT_BASIS_BYTES,
    MIN_SPARE_VECTORS,
    WORK_VECTORS,
    BasisWorkspace,
    basis_size,
    resolve_basis_dtype,
)
from diagnostics.linalg.lanczos_ritz import Wanted, eigenvalue_error_bound, sentinels_converged
from diagnostics.linalg.operator import LinearOperator, as_operator, square_dim

__all__ = ["EigenResult", "lanczos", "DEFAULT_BASIS_BYTES", "MIN_SPARE_VECTORS", "WORK_VECTORS"]

_WHICH = ("LA", "SA", "both")
_CRITERIA = ("residual", "eigenvalue")
#: Steps beyond the number of wanted eigenvalues taken before convergence is accepted.
MIN_EXTRA_STEPS = 4
#: DGKS: another Gram-Schmidt pass while a pass leaves less than this fraction of the vector's norm.
_DGKS_ETA = 1.0 / math.sqrt(2.0)
_MAX_PASSES = 3
#: A new Lanczos vector whose largest coefficient on the basis is below this fraction of sqrt(eps) (of the
#: basis dtype) times its norm is taken as it is, without a Gram-Schmidt subtraction.
_SEMI_ORTHOGONALITY = 0.01


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs with their quality.

    Attributes:
        eigenvalues: float64 ``[k]``; ``LA`` descending, ``SA`` ascending, ``both``: the ``k`` largest
            (descending) then the ``k`` smallest (ascending), ``2k`` values.
        eigenvectors: ``[P, k]`` (or ``[P, 2k]``) in the operator's dtype, or None when not requested;
            orthonormal to about ``tau m`` (``tau`` in the module docstring, m the basis size).
        residuals: float64, ``||A y_i - theta_i y_i||`` for each pair (exact in exact arithmetic; with a
            float32 basis, to about ``1e-6 ||A||``), never below ``eps ||A||`` for the operator's dtype
            (the rounding of one product, which the Lanczos estimate cannot see).
        converged: bool, ``residual_i <= tol * |theta_i|`` (or the eigenvalue error estimate, with
            ``criterion="eigenvalue"``).
        num_matvecs: products with single vectors (a ``[P, K]`` product counts ``K``).
        seconds: wall time.
        settings: the arguments and what happened (restarts, stop reason, basis size, dtype, device and
            bytes, extra Gram-Schmidt passes).
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


def _project_out(w: Tensor, B: Tensor) -> Tensor:
    """One classical Gram-Schmidt pass of ``w`` ``[P]`` against the orthonormal rows of ``B``, in place.

    Two reads of ``B`` (one matrix-vector product each way). Returns the coefficients ``B w``.
    """
    c = B @ w
    w.addmv_(B.T, c, alpha=-1.0)
    return c


def _fresh_direction(r: Tensor, bases: list[Tensor], threshold: float) -> Tensor | None:
    """``r`` orthogonalised twice against each basis and normalised; None when nothing of it is left."""
    n0 = float(r.norm())
    for _ in range(2):
        for B in bases:
            if B.shape[0]:
                _project_out(r, B)
    n = float(r.norm())
    if not n > threshold * n0:
        return None
    return r.div_(n)


def _rotate_rows(Q: Tensor, m: int, Sk: Tensor) -> None:
    """``Q[:K] = Sk^T Q[:m]`` in place for ``Sk`` ``[m, K]``, column chunk by column chunk.

    The chunks keep the temporary at about one P-vector, so a thick restart stays within the budget.
    """
    K = Sk.shape[1]
    St = Sk.T.to(dtype=Q.dtype, device=Q.device).contiguous()
    step = max(1, Q.shape[1] // max(K, 1))
    for lo in range(0, Q.shape[1], step):
        Q[:K, lo : lo + step] = St @ Q[:m, lo : lo + step]


def _orthonormal_rows(V: Tensor, rtol: float) -> Tensor:
    """An orthonormal basis of the span of ``V``'s rows ``[K, P]`` (dependent rows dropped), ``[K', P]``."""
    norms = V.norm(dim=1)
    if norms.numel() == 0 or float(norms.max()) == 0.0:
        return V[:0]
    V = V[norms > rtol * norms.max()]
    Qv, R = torch.linalg.qr(V.T)
    d = R.diagonal().abs()
    Qv = Qv[:, d > rtol * d.max()]
    # A second pass guards against loss of orthogonality in ill-conditioned blocks.
    Qv, _ = torch.linalg.qr(Qv)
    return Qv.T.contiguous()


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
    *,
    max_memory: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    workspace: BasisWorkspace | None = None,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos on a semi-orthogonal basis.

    ``LA`` gives the ``k`` largest *algebraic* eigenvalues (sharpness is the largest algebraic, not the
    largest magnitude), ``SA`` the ``k`` smallest, ``both`` the ``k`` largest then the ``k`` smallest.

    Args:
        op: a symmetric ``[P, P]`` LinearOperator or dense tensor.
        k: number of eigenpairs per end, ``1 <= k < P`` (``2k <= P`` for ``both``).
        which: ``"LA"``, ``"SA"`` or ``"both"``.
        tol: relative tolerance: of the residual, ``||A y - theta y|| <= tol |theta|`` (``criterion=
            "residual"``), or of the eigenvalue's estimated error, ``min(r, r^2 / gap) <= tol |theta|``
            (``criterion="eigenvalue"``, where ``gap`` is estimated from the other Ritz values). With a
            float32 basis, tolerances below about ``1e-6`` may not be reachable; a residual is never taken
            below ``eps ||A||`` of the operator's dtype, and once every wanted pair that has not met ``tol``
            is there the run stops (``settings["stop"]`` begins with ``"precision limit"``).
        max_steps: basis size ``m`` in vectors; a thick restart compresses the basis to Ritz vectors when
            it is full. Default ``min(P, max(2 * nwanted + 20, 40))``, lowered to fit ``max_memory``.
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
        max_memory: bytes for the basis and its workspace, ``(m + 4) P itemsize <= max_memory``; the basis
            size is lowered to fit (ConfigError if not even ``nwanted + 1`` vectors fit). None: the
            automatic budget, :data:`DEFAULT_BASIS_BYTES` (2 GiB; at most half the free memory of a CUDA
            device), which never lowers the basis below ``nwanted + 8`` vectors; not applied when
            ``max_steps`` is given.
        basis_dtype: ``torch.float32`` or ``torch.float64``; default the operator's dtype (float32 for
            half-precision operators). float64 doubles the memory and the bookkeeping time.
        basis_device: where the basis lives, e.g. ``"cpu"`` for a GPU operator whose basis does not fit
            on the GPU (each product then moves two P-vectors between devices); default the operator's.
        workspace: a :class:`BasisWorkspace` that keeps the basis memory for the next call (a caller that
            runs Lanczos repeatedly); None: the basis is allocated for this call and freed after it.

    Returns:
        EigenResult. On a budget or precision-limit stop ``converged`` is False for the pairs that did not
        meet ``tol``.
        ``settings`` records ``basis_vectors`` (``m``), ``basis_bytes`` (the basis buffer),
        ``basis_dtype``, ``basis_device``, ``memory_budget``, ``basis_size_from`` (what set ``m``),
        ``basis_reused`` (the basis came from ``workspace``'s kept memory),
        ``extra_passes`` (second and third Gram-Schmidt passes) and ``skipped_passes`` (steps whose new
        vector was semi-orthogonal already and was not orthogonalised). Returned eigenvectors are
        orthonormal to about ``tau m`` (module docstring).

    Cost: one matvec per step, typically ``k`` plus a few for separated outliers. Bookkeeping per step:
    the coefficients on the basis (one ``[m, P]`` matrix-vector product in the basis dtype), and a
    Gram-Schmidt subtraction (a second one) only when they exceed the semi-orthogonality level, with a
    further pass where the DGKS test asks for one, a few P-vector operations and
    ``O(m^3)`` float64 work on the CPU for the Ritz problem. Memory: ``m P itemsize`` for the basis plus
    about four P-vectors of workspace on the basis device, ``O(m^2)`` float64 on the CPU, and the
    returned ``[P, k]`` eigenvectors.

    Raises:
        ConfigError: ``k`` out of range, unknown ``which``, ``max_steps`` too small, ``max_memory`` too
            small, bad ``v0`` shape or ``basis_dtype``.

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
                    criterion=criterion, max_memory=max_memory, basis_dtype=basis_dtype,
                    basis_device=basis_device, workspace=workspace)


def _lanczos(*args: Any, **kwargs: Any) -> EigenResult:
    """:func:`_lanczos_steps` run to the end (its arguments): :func:`lanczos` with the Gram-Schmidt pass
    optional (``full_reorth``), for the tests that show why the pass is needed."""
    steps = _lanczos_steps(*args, **kwargs)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _lanczos_steps(
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
    max_memory: int | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    workspace: BasisWorkspace | None = None,
) -> Generator[EigenResult | None, str | None, EigenResult]:
    """The method, pausing before each product: yields None there (sent ``"interim"``, it yields the
    eigenpairs found so far without vectors, and pauses again) and returns the :class:`EigenResult`.

    ``seconds`` and ``max_seconds`` count the time spent inside the generator only, not the pauses.
    """
    spent, resumed = 0.0, time.perf_counter()
    A = as_operator(op)
    P = square_dim(A, "lanczos")
    if which not in _WHICH:
        raise ConfigError(f"lanczos: which must be one of {_WHICH}, got {which!r}")
    k = int(k)
    if k < 1 or k >= P:
        raise ConfigError(f"lanczos: k={k} must satisfy 1 <= k < P, the operator's dimension P={P}")
    wanted = Wanted(which, k)
    if wanted.count > P:
        raise ConfigError(f"lanczos: which='both' needs 2*k <= P, got k={k} and P={P}")
    if not tol > 0:
        raise ConfigError(f"lanczos: tol must be positive, got {tol}")
    if criterion not in _CRITERIA:
        raise ConfigError(f"lanczos: criterion must be one of {_CRITERIA}, got {criterion!r}")
    if max_matvecs is not None and max_matvecs < 1:
        raise ConfigError(f"lanczos: max_matvecs must be >= 1, got {max_matvecs}")
    dtype = resolve_basis_dtype(A.dtype, basis_dtype)
    device = torch.device(A.device) if basis_device is None else torch.device(basis_device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    cap, budget, size_from = basis_size(P, wanted.count, max_steps, max_memory, itemsize, device)

    f64 = torch.float64
    eps = torch.finfo(dtype).eps
    # Breakdown thresholds relative to ||A||: float64 keeps the historical values, float32 sits above its
    # rounding level (a remainder of a few eps ||A|| is noise, not a new direction).
    drop_tol, near_tol, rank_rtol = max(1e-12, 8 * eps), max(1e-8, 64 * eps), max(1e-10, 10 * eps)
    # Below this level a new vector's coefficients on the basis are not subtracted (see the step below):
    # a fraction of sqrt(eps), or the rounding noise of a length-P dot product (about eps sqrt(P) of the
    # vector's norm: coefficients that small cannot be told from noise, and subtracting them does not
    # make the vector more orthogonal), but never above sqrt(eps), the level semi-orthogonality needs.
    semi_tol = min(math.sqrt(eps), max(_SEMI_ORTHOGONALITY * math.sqrt(eps), 2.0 * eps * math.sqrt(P)))
    gen = torch.Generator()
    gen_seed = int(seed)
    restarts_drawn = 0

    def random_vector() -> Tensor:
        nonlocal restarts_drawn
        restarts_drawn += 1
        gen.manual_seed(gen_seed * 7919 + restarts_drawn)
        return torch.randn(P, generator=gen, dtype=dtype).to(device)

    # Frontier F (rows, not yet multiplied), its coupling E = F A Q_M^T, basis Q_M (rows) and H = Q_M A Q_M^T.
    if v0 is None:
        start, warm, warm_cols = random_vector(), None, 0
    else:
        if not isinstance(v0, Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != P:
            raise ConfigError(f"lanczos: v0 must have shape [P] or [P, K] with P={P}, "
                              f"got {tuple(getattr(v0, 'shape', ()))}")
        block = v0[None] if v0.dim() == 1 else v0.T
        block = _orthonormal_rows(block.to(dtype=dtype, device=device), rank_rtol)
        warm = "vector" if v0.dim() == 1 or v0.shape[1] == 1 else f"block {v0.shape[1]}"
        warm_cols = block.shape[0] if block.shape[0] > 1 else 0
        # A block start begins from the sum of an orthonormal basis of its span: the Krylov space then
        # holds the whole span after about K steps and keeps growing towards the rest of the wanted
        # space. On outlier-dominated spectra this took fewer matvecs than a block Rayleigh-Ritz start.
        start = block.sum(0)
    F = _fresh_direction(start, [], 0.0)
    if F is None:  # a zero warm start carries no direction
        F = _fresh_direction(random_vector(), [], 0.0)
    F = F[None]
    if workspace is None:
        workspace = BasisWorkspace(max_bytes=0)  # keeps nothing: the basis lives for this call only
    Q, basis_reused = workspace.take(cap, P, dtype, device)
    spare: Tensor | None = None  # the new vector's place when the basis is full
    m = num_matvecs = restarts = extra_passes = skipped_passes = 0
    H, S, E = torch.zeros(0, 0, dtype=f64), torch.zeros(0, 0, dtype=f64), torch.zeros(1, 0, dtype=f64)
    theta, res_all = torch.zeros(0, dtype=f64), torch.zeros(0, dtype=f64)
    conv_all = at_floor = torch.zeros(0, dtype=torch.bool)
    hard_cap = max_matvecs if max_matvecs is not None else max(50 * cap, 20 * P if P < 1000 else 0, 2000)
    scale = norm_a = 0.0  # running estimates of ||A||: for breakdown tests; for the precision floor
    op_eps = torch.finfo(A.dtype).eps if A.dtype.is_floating_point else eps  # the products' rounding unit
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

    def collect(with_vectors: bool, why: str) -> EigenResult:
        """The wanted pairs found so far, in output order, with their quality and the settings."""
        idx = wanted.select(theta)
        n_found = idx.numel()
        eigenvalues = torch.full((wanted.count,), float("nan"), dtype=f64)
        residuals = torch.full((wanted.count,), float("inf"), dtype=f64)
        converged = torch.zeros(wanted.count, dtype=torch.bool)
        vectors = None
        if with_vectors:
            vectors = torch.zeros(P, wanted.count, dtype=A.dtype, device=A.device)
        # Place found pairs: top part first, bottom part after (same layout even when m < count).
        n_top = min(wanted.top, n_found)
        slots = list(range(n_top)) + [wanted.top + j for j in range(n_found - n_top)]
        if n_found:
            slots_t = torch.tensor(slots, dtype=torch.long)
            eigenvalues[slots_t] = theta[idx]
            residuals[slots_t] = res_all[idx]
            converged[slots_t] = conv_all[idx]
            if vectors is not None:
                Y = S[:, idx].to(dtype=dtype, device=device)
                cols = slots_t.to(A.device)
                step = max(1, P // n_found)  # temporaries of about one P-vector
                for lo in range(0, P, step):
                    part = Q[:m, lo : lo + step].T @ Y
                    vectors[lo : lo + step, cols] = part.to(dtype=A.dtype, device=A.device)
        settings = {
            "k": k, "which": which, "tol": tol, "max_steps": cap, "seed": seed, "warm_start": warm,
            "max_matvecs": max_matvecs, "max_seconds": max_seconds, "restarts": restarts, "stop": why,
            "reorthogonalization": "full" if full_reorth else "none", "criterion": criterion,
            "basis_vectors": cap, "basis_bytes": Q.numel() * Q.element_size(),
            "basis_dtype": str(dtype).removeprefix("torch."), "basis_device": str(device),
            "memory_budget": budget, "basis_size_from": size_from, "basis_reused": basis_reused,
            "extra_passes": extra_passes,
            "skipped_passes": skipped_passes,
        }
        return EigenResult(
            eigenvalues=eigenvalues, eigenvectors=vectors, residuals=residuals, converged=converged,
            num_matvecs=num_matvecs, settings=settings,
            seconds=spent if why == "paused" else spent + time.perf_counter() - resumed,
        )

    while True:
        # Converged or the whole space explored: done.
        if m == P:
            stop = "invariant subspace"
            break
        if near_invariant:
            # The newest Lanczos vector is tiny: the Krylov space is invariant up to ~1e-8 and would
            # hide further copies of eigenvalues it holds. Keep that vector in the frontier (so that
            # residuals stay exact) and continue from a fresh random vector, multiplied next (when no
            # direction is left, the tiny vector itself is multiplied next).
            searching_complement = True
            r = _fresh_direction(random_vector(), [Q[:m], F], near_tol)
            if r is not None:
                F = torch.cat([F, r[None]], 0)
                E = torch.cat([E, torch.zeros(1, m, dtype=f64)], 0)
        near_invariant = False
        if m >= min_steps and F.shape[0] > 0:
            idx = wanted.select(theta)
            sentinels = sentinels_converged(wanted, theta, S, conv_all, new_weight[:m], searching_complement)
            if bool(conv_all[idx].all()) and sentinels:
                stop = "converged"
                break
            if bool((conv_all | at_floor)[idx].all()) and sentinels:
                # The pairs short of tol are as accurate as the products allow: more steps cannot help.
                stop = (f"precision limit: residuals at eps ||A|| = {op_eps * norm_a:.2g} of the {A.dtype} products "
                        f"exceed tol |theta|; raise tol or use float64 products")
                break
        if F.shape[0] == 0:
            # The Krylov space became invariant. Its Ritz values are exact, but eigenvalues outside it
            # (e.g. further copies of a repeated eigenvalue) are invisible to it: continue from a fresh
            # random vector orthogonal to the basis, and stop only once that new sequence's own extreme
            # Ritz values have converged too (they then bound what the complement holds).
            searching_complement = True
            r = _fresh_direction(random_vector(), [Q[:m]], near_tol)
            if r is None:
                stop = "invariant subspace"
                break
            F = r[None]
            E = torch.zeros(1, m, dtype=f64)
        if num_matvecs + 1 > hard_cap:
            stop = "max_matvecs" if max_matvecs is not None else "iteration cap"
            break
        if max_seconds is not None and spent + time.perf_counter() - resumed > max_seconds:
            stop = "max_seconds"
            break
        if m + 1 > cap:
            # Thick restart: keep the Ritz vectors nearest the wanted end(s) and the frontier.
            keep_n = min(m, cap - 1, wanted.count + max(1, (cap - wanted.count) // 2))
            keep = wanted.keep(theta, keep_n)
            Sk = S[:, keep]
            _rotate_rows(Q, m, Sk)
            m = keep_n
            H = torch.diag(theta[keep])
            E = E @ Sk
            theta, S = theta[keep], torch.eye(keep_n, dtype=f64)
            res_all, conv_all, at_floor = res_all[keep], conv_all[keep], at_floor[keep]
            new_weight[:keep_n] = (Sk.square() * new_weight[: Sk.shape[0], None]).sum(0)
            restarts += 1
        # A pause before the product (LanczosRun.advance stops here; lanczos() never does).
        spent += time.perf_counter() - resumed
        request = yield None
        while request == "interim":
            request = yield collect(False, "paused")
        resumed = time.perf_counter()
        # The newest frontier vector is the Lanczos vector; older ones (tiny remainders) are only kept.
        # It usually already sits in the next basis row (written there at the end of the previous step).
        if F[-1].data_ptr() != Q[m].data_ptr():
            Q[m].copy_(F[-1])
        x = Q[m]
        F_rest, E_x, E_rest = F[:-1], E[-1], E[:-1]
        product = A @ x.to(dtype=A.dtype, device=A.device)
        num_matvecs += 1
        product = product.to(dtype=dtype, device=device)
        new_weight[m] = 1.0 if searching_complement else 0.0

        # Known components first: q_j^T A x = E_xj by symmetry, and x^T A x. Removing them before the
        # Gram-Schmidt pass leaves that pass only rounding errors to remove, so one pass usually suffices.
        # E_x is nonzero on the previous Lanczos vector only, except just after a restart.
        alpha = float(torch.dot(x, product))
        nz = E_x.nonzero()
        lo = int(nz.min()) if nz.numel() else m
        coef = torch.cat([E_x[lo:], torch.tensor([alpha], dtype=f64)]).to(dtype=dtype, device=device)
        # The new vector is built in the basis row it will occupy and normalised there in place, instead
        # of in a workspace vector copied into the row: one pass over P fewer, and no second P-vector.
        if m + 1 < cap:
            work = Q[m + 1]
        else:
            if spare is None:
                spare = torch.empty(P, dtype=dtype, device=device)
            work = spare
        torch.addmv(product, Q[lo : m + 1].T, coef, alpha=-1.0, out=work)
        del product
        c_m, c_f = torch.zeros(m + 1, dtype=f64), torch.zeros(F_rest.shape[0], dtype=f64)
        if full_reorth:
            # The frontier's older rows (tiny remainders, rarely any) are a second block: no copy of the basis.
            blocks = [Q[: m + 1], F_rest] if F_rest.shape[0] else [Q[: m + 1]]
            # The new vector sits in the basis row after the block (the usual case): the first pass's product
            # with that row too gives its squared norm, so no separate pass over it and no second host sync.
            in_row = m + 1 < cap
            for p in range(_MAX_PASSES):
                extra_passes += p > 0
                with_norm = p == 0 and in_row
                coefs = [(Q[: m + 2] if with_norm and i == 0 else B) @ work for i, B in enumerate(blocks)]
                c = torch.cat([cb.to(device="cpu", dtype=f64) for cb in coefs])
                if with_norm:  # the last coefficient of the first block is work . work
                    rem = math.sqrt(max(float(c[m + 1]), 0.0))
                    c, coefs[0] = torch.cat([c[: m + 1], c[m + 2 :]]), coefs[0][: m + 1]
                if p == 0:
                    if not in_row:
                        rem = float(work.norm())
                    if float(c.abs().max()) <= semi_tol * rem:
                        # Already orthogonal to the basis to within semi_tol: subtracting would only remove
                        # rounding, at the cost of a second read of the whole basis. Not subtracting keeps
                        # the Lanczos relation exact (the coefficients are not folded into H either); the
                        # basis stays semi-orthogonal, which keeps the Ritz values as accurate as a fully
                        # orthogonal basis would (Simon 1984) and rules out ghost eigenvalues.
                        skipped_passes += 1
                        break
                for B, cb in zip(blocks, coefs):
                    work.addmv_(B.T, cb, alpha=-1.0)
                c_m += c[: m + 1]
                c_f += c[m + 1 :]
                rem = float(work.norm())
                # DGKS with the pass's own coefficients: the norm before it was sqrt(rem^2 + |c|^2).
                if float(c.square().sum()) <= (1.0 / _DGKS_ETA**2 - 1.0) * rem * rem:
                    break
        else:
            # The plain three-term recurrence (for the tests that show why the pass is needed).
            rem = float(work.norm())
        # ||A x||^2 by Pythagoras over the orthonormal pieces it was split into.
        h_xx = alpha + float(c_m[m])
        norm_ax = math.sqrt(float(E_x.square().sum() + c_m[:m].square().sum() + c_f.square().sum())
                            + h_xx * h_xx + rem * rem)
        scale = max(scale, norm_ax)
        corner = torch.cat([E_x, torch.tensor([h_xx], dtype=f64)])[None]
        H = torch.cat([torch.cat([H, E_x[:, None]], 1), corner])

        # The remainder is the new frontier direction; a negligible one means invariance.
        new_direction = rem > drop_tol * max(scale, 1e-300)
        near_invariant = rem <= near_tol * max(scale, 1e-300)
        nf = F_rest.shape[0]
        E_new = torch.zeros(nf + int(new_direction), m + 1, dtype=f64)
        E_new[:nf, :m], E_new[:nf, m] = E_rest, c_f
        if new_direction:
            E_new[nf, m] = rem
            if nf == 0:
                # Already in the basis row it will occupy once multiplied (no copy next step).
                F = work.div_(rem)[None]
            else:
                F = torch.cat([F_rest, (work / rem)[None]], 0)
        else:
            F = F_rest
        E = E_new
        m += 1

        # Rayleigh-Ritz on the multiplied basis and exact residual norms ||E s_i||.
        theta, S = torch.linalg.eigh(H)
        res_all = (E @ S).norm(dim=0) if E.shape[0] else torch.zeros(m, dtype=f64)
        # ||E s|| is the residual of exact products; the operator's own rounding (about eps ||A|| per
        # product) is invisible to it, so no pair is reported, or accepted, as more accurate than that.
        # ||A|| is at least the largest ||A x|| seen and the largest |theta| (m >= 1 here).
        theta_max = float(theta.abs().max())
        norm_a = max(scale, theta_max)
        precision = op_eps * norm_a
        at_floor = res_all <= precision
        res_all = res_all.clamp_min(precision)
        floor = 1e-10 * theta_max
        # An eigenvalue is not known more precisely than its products either: the same floor.
        bound = res_all if criterion == "residual" else eigenvalue_error_bound(theta, res_all).clamp_min(precision)
        conv_all = bound <= tol * torch.clamp(theta.abs(), min=floor)

    return collect(return_eigenvectors, stop)
