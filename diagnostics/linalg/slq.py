"""Spectral density by stochastic Lanczos quadrature (SLQ).

For a unit probe ``z``, ``m`` Lanczos steps give a tridiagonal ``T`` with ``z^T f(A) z ≈ e_1^T f(T) e_1 =
sum_j w_j f(theta_j)``: nodes ``theta_j`` are the Ritz values and weights ``w_j`` the squared first
components of the Ritz vectors (Golub & Meurant 2010; Ubaru, Chen, Saad 2017; Ghorbani, Krishnan, Xiao
2019). Averaging the node measures over Rademacher probes estimates the spectral measure
``(1/P) sum_i delta(lambda - lambda_i)``.
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
from diagnostics.linalg.operator import LinearOperator, as_operator, matmul64, rademacher_probes, square_dim
from diagnostics.linalg.stepped import SteppedRun

__all__ = ["DensityRun", "SpectralDensity", "spectral_density"]


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of each probe, the raw form of a spectral density estimate.

    Attributes:
        nodes: float64 ``[num_probes, m]`` Ritz values per probe (a probe whose Krylov space closed early
            is padded by repeating its last node with weight 0).
        weights: float64 ``[num_probes, m]``, each row sums to 1.
        num_matvecs: single-vector products used.
        seconds: wall time.
        settings: ``num_probes``, ``steps``, ``seed``, ``dim`` (P).
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def density(self, grid: Tensor, sigma2: float = 1e-5) -> Tensor:
        """Gaussian-smoothed density on ``grid``: ``mean_probes sum_j w_j N(t; theta_j, s^2)``.

        The kernel variance is ``s^2 = sigma2 * (lambda_max - lambda_min)`` with the extreme nodes as the
        spectrum's range (Ghorbani et al. 2019). Each kernel integrates to 1 and each probe's weights sum
        to 1, so the density integrates to 1 over the real line.

        Returns:
            float64 tensor of ``grid``'s shape.
        """
        if sigma2 <= 0:
            raise ConfigError(f"density: sigma2 must be positive, got {sigma2}")
        grid = torch.as_tensor(grid, dtype=torch.float64)
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        width = hi - lo if hi > lo else max(abs(hi), 1.0)
        var = sigma2 * width
        diff = grid.reshape(-1, 1, 1) - self.nodes.unsqueeze(0)
        kernel = torch.exp(-0.5 * diff.square() / var) / math.sqrt(2 * math.pi * var)
        dens = (kernel * self.weights.unsqueeze(0)).sum(-1).mean(-1)
        return dens.reshape(grid.shape)

    def trace(self) -> tuple[float, float]:
        """``tr(A) ≈ P * mean_probes sum_j w_j theta_j`` and its standard error (NaN for one probe).

        Equals :func:`hutchinson_trace` with the same seed and number of probes, since
        ``sum_j w_j theta_j = e_1^T T e_1 = z^T A z`` for the normalised probe ``z``.
        """
        per_probe = self.settings["dim"] * (self.weights * self.nodes).sum(1)
        n = per_probe.shape[0]
        stderr = float(per_probe.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return float(per_probe.mean()), stderr


def spectral_density(op: LinearOperator | Tensor, num_probes: int = 4, steps: int = 32,
                     seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral measure of a symmetric operator.

    Runs ``m = min(steps, P)`` Lanczos steps with full reorthogonalisation (twice) from each normalised
    Rademacher probe ``z_j / sqrt(P)``, all probes advancing together in one ``[P, num_probes]`` product
    per step. Probe ``j`` is the same vector :func:`hutchinson_trace` uses for the same seed.

    Args:
        op: a symmetric ``[P, P]`` operator or dense tensor.
        num_probes: number of probes ``>= 1``.
        steps: Lanczos steps per probe ``>= 1``.
        seed: seed of the private probe generator (global RNG untouched).

    Returns:
        SpectralDensity with ``nodes`` and ``weights`` of shape ``[num_probes, m]``.

    Cost: ``num_probes * m`` matvecs in ``m`` batched products; memory ``num_probes * P * m`` float64.

    Example:
        >>> sd = spectral_density(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 2, 3)
        >>> sorted(round(x, 10) for x in sd.nodes[0].tolist()), round(sd.trace()[0], 10)
        ([1.0, 2.0, 3.0], 6.0)
    """
    steps_ = _slq_steps(op, num_probes, steps, seed)
    while True:
        try:
            next(steps_)
        except StopIteration as end:
            return end.value


class DensityRun(SteppedRun[SpectralDensity]):
    """:func:`spectral_density` in slices: each :meth:`advance` runs batched products (one per Lanczos
    step of all probes) until the quadrature is complete or that call's limit is reached.

    Sliced or not, the arithmetic is the same as one :func:`spectral_density` call with the same
    arguments. Between calls the run holds its basis (``num_probes * P * m`` float64 numbers) and the
    operator, which must not change meanwhile.

    Example:
        >>> run = DensityRun(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 2, 3)
        >>> while run.advance(max_steps=1) is None:
        ...     pass
        >>> round(run.result.trace()[0], 10)
        6.0
    """

    def __init__(self, op: LinearOperator | Tensor, num_probes: int = 4, steps: int = 32, seed: int = 0) -> None:
        """Validate the arguments and draw the probes (no product yet). Raises as :func:`spectral_density`."""
        super().__init__(_slq_steps(op, num_probes, steps, seed), "DensityRun")


def _slq_steps(op: LinearOperator | Tensor, num_probes: int, steps: int, seed: int
               ) -> Generator[None, None, SpectralDensity]:
    """:func:`spectral_density` as a generator that pauses before each batched product; ``seconds``
    counts its own time only."""
    clock = time.perf_counter()
    spent = 0.0
    A = as_operator(op)
    P = square_dim(A, "spectral_density")
    if int(num_probes) < 1:
        raise ConfigError(f"spectral_density: num_probes must be >= 1, got {num_probes}")
    if int(steps) < 1:
        raise ConfigError(f"spectral_density: steps must be >= 1, got {steps}")
    n, m = int(num_probes), min(int(steps), P)
    device = A.device
    Q = torch.zeros(n, m, P, dtype=torch.float64, device=device)
    Q[:, 0] = rademacher_probes(P, 0, n, seed, device).T / math.sqrt(P)
    alpha = torch.zeros(n, m, dtype=torch.float64)
    beta = torch.zeros(n, m, dtype=torch.float64)
    length = torch.full((n,), m, dtype=torch.long)
    active = torch.ones(n, dtype=torch.bool)
    num_matvecs = 0
    for j in range(m):
        idx = active.nonzero().flatten()
        if idx.numel() == 0:
            break
        # While every probe is active (the usual case) the basis is a view: no per-step gather copy.
        every = idx.numel() == n
        V = Q[:, j] if every else Q[idx, j]  # [a, P]
        spent += time.perf_counter() - clock
        yield
        clock = time.perf_counter()
        W = matmul64(A, V.T).T
        num_matvecs += idx.numel()
        a = (V * W).sum(1)
        alpha[idx, j] = a.cpu()
        if j + 1 == m:
            break
        w_norm = W.norm(dim=1)
        basis = Q[:, : j + 1] if every else Q[idx, : j + 1]  # [a, j+1, P]
        for _ in range(2):  # full reorthogonalisation, twice
            c = torch.bmm(basis, W.unsqueeze(2))
            W = W - torch.bmm(basis.transpose(1, 2), c).squeeze(2)
        b = W.norm(dim=1)
        closed = b <= 1e-12 * w_norm
        open_ = ~closed
        if bool(open_.all()):
            beta[idx, j] = b.cpu()
            Q[idx, j + 1] = W / b[:, None]
        else:
            # The Krylov space is invariant for the closed probes: their quadrature is exact with j+1 nodes.
            closed_cpu = closed.cpu()  # idx, length and active live on the CPU
            length[idx[closed_cpu]] = j + 1
            active[idx[closed_cpu]] = False
            beta[idx[~closed_cpu], j] = b[open_].cpu()
            Q[idx[~closed_cpu].to(Q.device), j + 1] = W[open_] / b[open_, None]
    nodes = torch.zeros(n, m, dtype=torch.float64)
    weights = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        L = int(length[i])
        T = torch.diag(alpha[i, :L]) + torch.diag(beta[i, : L - 1], 1) + torch.diag(beta[i, : L - 1], -1)
        theta, S = torch.linalg.eigh(T)
        nodes[i, :L] = theta
        nodes[i, L:] = theta[-1]
        w = S[0].square()
        weights[i, :L] = w / w.sum()
    return SpectralDensity(
        nodes=nodes, weights=weights, num_matvecs=num_matvecs, seconds=spent + time.perf_counter() - clock,
        settings={"num_probes": n, "steps": m, "seed": seed, "dim": P, "probes": "rademacher",
                  "reorthogonalization": "full"},
    )
