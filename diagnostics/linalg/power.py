"""Top singular triplet of a matrix by warm-started power iteration: to convergence for one matrix, or a
fixed number of steps for a stack of matrices (tracking v_1 from probe to probe)."""

from __future__ import annotations

import torch
from torch import Tensor

from diagnostics.errors import ConfigError, DataError
from diagnostics.linalg.operator import gaussian_start

__all__ = ["top_singular_vector", "power_iteration", "power_steps"]


def top_singular_vector(W: Tensor, v0: Tensor | None = None, iters: int = 100, tol: float = 1e-6,
                        seed: int = 0) -> tuple[float, Tensor, Tensor, int]:
    """Top singular triplet ``W v = sigma u`` by power iteration on ``W^T W``.

    Each iteration computes ``u = W v / ||W v||`` and ``v = W^T u / ||W^T u||``; it stops when
    ``sigma`` changes by at most ``tol * sigma`` and ``1 - |<v, v_prev>| <= tol``. A warm start ``v0`` (e.g.
    the previous probe's ``v``) usually converges in a few iterations, and the returned ``v`` has the sign
    with ``<v, v0> >= 0`` so that statistics that depend on the sign stay continuous; without ``v0`` the
    largest-magnitude entry of ``v`` is made positive. Convergence rate ``(sigma_2 / sigma_1)^2``.

    Args:
        W: ``[out, in]`` matrix (``v`` lives on the input side, ``u`` on the output side).
        v0: ``[in]`` start vector or None (private-generator Gaussian start from ``seed``).
        iters: maximum number of iterations (each: one product with ``W`` and one with ``W^T``).
        tol: relative tolerance.
        seed: seed of the start vector when ``v0`` is None (the global RNG is untouched).

    Returns:
        ``(sigma, u, v, iterations)`` with ``u``, ``v`` unit vectors in ``W``'s dtype.

    Example:
        >>> s, u, v, it = top_singular_vector(torch.diag(torch.tensor([3.0, 1.0])), v0=torch.tensor([1.0, 1.0]))
        >>> round(s, 6), [round(x, 4) for x in v.tolist()]
        (3.0, [1.0, 0.0])
    """
    if not isinstance(W, Tensor) or W.dim() != 2:
        raise ConfigError(f"top_singular_vector needs a 2-D matrix, got shape {tuple(getattr(W, 'shape', ()))}")
    if iters < 1:
        raise ConfigError(f"top_singular_vector: iters must be >= 1, got {iters}")
    M = W.detach().to(torch.float64)
    n_in = M.shape[1]
    if v0 is not None:
        if v0.dim() != 1 or v0.shape[0] != n_in:
            raise ConfigError(f"top_singular_vector: v0 must have shape [{n_in}], got {tuple(v0.shape)}")
        v = v0.detach().to(dtype=torch.float64, device=M.device)
    else:
        v = gaussian_start(n_in, 1, seed)[:, 0].to(M.device)
    norm = v.norm()
    if norm == 0:
        v = gaussian_start(n_in, 1, seed)[:, 0].to(M.device)
        norm = v.norm()
    v = v / norm
    sigma = 0.0
    u = torch.zeros(M.shape[0], dtype=torch.float64, device=M.device)
    it = 0
    for it in range(1, iters + 1):
        Wv = M @ v
        s_u = Wv.norm()
        if s_u == 0:
            if float(M.abs().max()) == 0.0:
                raise DataError("top_singular_vector: the matrix is zero; it has no top singular vector")
            v = gaussian_start(n_in, 1, seed + it)[:, 0].to(M.device)
            v = v / v.norm()
            continue
        u = Wv / s_u
        WTu = M.T @ u
        new_sigma = float(WTu.norm())
        v_new = WTu / new_sigma
        done = abs(new_sigma - sigma) <= tol * new_sigma and 1.0 - abs(float(v_new @ v)) <= tol
        v, sigma = v_new, new_sigma
        if done:
            break
    u = M @ v
    sigma = float(u.norm())
    u = u / sigma
    if v0 is not None:
        flip = float(v @ v0.to(dtype=torch.float64, device=M.device)) < 0
    else:
        flip = float(v[v.abs().argmax()]) < 0
    if flip:
        u, v = -u, -v
    return sigma, u.to(W.dtype), v.to(W.dtype), it


#: Alias used in the contracts: the warm-started power iteration for the top singular triplet.
power_iteration = top_singular_vector


def power_steps(W: Tensor, v0: Tensor, iters: int = 1) -> tuple[Tensor, Tensor]:
    """``iters`` warm-started power-iteration steps ``v <- W^T W v / ||W^T W v||`` on a stack of matrices.

    The step of :func:`top_singular_vector` without its stopping test and host syncs, batched over a
    stack of equally shaped matrices: tracking the top right singular vector of slowly changing weights
    costs ``2 * iters`` batched products per stack. Since ``v0^T (W^T W) v0 >= 0`` a step never flips
    the sign of ``v``, so a sign chosen once is carried along. Computed in ``W``'s dtype promoted to at
    least float32, on ``W``'s device.

    Args:
        W: ``[G, out, in]`` (or one ``[out, in]``) matrices.
        v0: ``[G, in]`` (or ``[in]``) unit start vectors, e.g. the previous probe's ``v``.
        iters: number of steps (>= 1).

    Returns:
        ``(sigma, v)``: ``sigma`` ``[G]`` (or a 0-d tensor) ``= ||W^T W x|| / ||W x||`` for the last
        step's start vector ``x``, a lower bound of ``sigma_1`` at least ``||W x||`` that converges with
        the iteration, and ``v`` ``[G, in]`` (or ``[in]``) unit vectors; both on
        ``W``'s device, not synchronised (a zero or non-finite ``W`` gives non-finite values).

    Example:
        >>> s, v = power_steps(torch.diag(torch.tensor([3.0, 1.0])), torch.tensor([0.6, 0.8]), iters=30)
        >>> round(float(s), 4), [round(x, 4) for x in v.tolist()]
        (3.0, [1.0, 0.0])
    """
    if iters < 1:
        raise ConfigError(f"power_steps: iters must be >= 1, got {iters}")
    if W.dim() not in (2, 3) or v0.dim() != W.dim() - 1 or v0.shape[-1] != W.shape[-1]:
        raise ConfigError(
            f"power_steps: W must be [G, out, in] or [out, in] and v0 [G, in] or [in]; got {tuple(W.shape)}, "
            f"{tuple(v0.shape)}"
        )
    ct = torch.promote_types(W.dtype, torch.float32)
    # (the checks skip no-op conversions: this runs at every step, where each call costs microseconds)
    Ws = W if W.dtype == ct else W.to(ct)
    Wt = Ws.transpose(-2, -1)
    # Row vectors times matrices (v^T W^T, u^T W): on CPU a batched product with one column runs several
    # times slower than the same product with one row (benchmarks/RESULTS.md, "Spectral alignment every
    # step"); on GPUs both forms cost the same.
    v = (v0 if v0.dtype == ct and v0.device == W.device else v0.to(device=W.device, dtype=ct)).unsqueeze(-2)
    for _ in range(iters):
        u = v @ Wt  # W v
        v = u @ Ws  # W^T W v
        norm_v = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        # ||W^T W v|| / ||W v|| lies between ||W v|| and sigma_1 (Cauchy-Schwarz), without a third product.
        sigma = (norm_v / torch.linalg.vector_norm(u, dim=-1, keepdim=True)).squeeze(-1).squeeze(-1)
        v = v / norm_v
    return sigma, v.squeeze(-2)
