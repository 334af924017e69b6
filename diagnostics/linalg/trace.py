"""Stochastic trace estimators: Hutchinson and Hutch++.

Hutchinson (1989): ``tr(A) = E[z^T A z]`` for Rademacher ``z``; report the sample mean and its standard
error. Hutch++ (Meyer, Musco, Musco, Woodruff 2021, SOSA): spend a third of the products on a sketch
``Q = orth(A S)``, take ``tr(Q^T A Q)`` exactly and Hutchinson only on the deflated remainder
``(I - QQ^T) A (I - QQ^T)``; far lower variance when a few outliers dominate the trace.

Products are taken in blocks of ``block_size`` columns, so operators that batch ``[P, K]`` products
(vmap-ed HVPs) are used efficiently.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.operator import LinearOperator, as_operator, matmul64, rademacher_probes, square_dim

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace"]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error.

    Attributes:
        mean: the estimate.
        stderr: standard error of the stochastic part (sample std / sqrt(#probes)); 0 when exact.
        num_matvecs: single-vector products used.
        seconds: wall time.
        settings: method, seed, probe counts, block size.
    """

    mean: float
    stderr: float
    num_matvecs: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)


def _check(op: LinearOperator | Tensor, num_matvecs: int, block_size: int, what: str, least: int):
    A = as_operator(op)
    P = square_dim(A, what)
    if int(num_matvecs) < least:
        raise ConfigError(f"{what}: num_matvecs must be >= {least}, got {num_matvecs}")
    if int(block_size) < 1:
        raise ConfigError(f"{what}: block_size must be >= 1, got {block_size}")
    return A, P


def _quadratic_forms(A: LinearOperator, P: int, start: int, count: int, seed: int, block_size: int,
                     project: Tensor | None = None) -> Tensor:
    """``z_j^T B z_j`` for probes ``start..start+count-1``; ``B = A`` or the deflated ``(I-QQ^T)A(I-QQ^T)``."""
    values = []
    for b0 in range(0, count, block_size):
        Z = rademacher_probes(P, start + b0, min(block_size, count - b0), seed, device=A.device)
        if project is not None:
            Z = Z - project @ (project.T @ Z)
        AZ = matmul64(A, Z)
        if project is not None:
            AZ = AZ - project @ (project.T @ AZ)
        values.append((Z * AZ).sum(0).cpu())
    return torch.cat(values)


def hutchinson_trace(op: LinearOperator | Tensor, num_matvecs: int = 100, seed: int = 0,
                     block_size: int = 32) -> TraceEstimate:
    """Hutchinson's estimate ``(1/n) sum_j z_j^T A z_j`` with Rademacher ``z_j``, mean ± standard error.

    Probe ``j`` of a seed is the same Rademacher vector that :func:`spectral_density` normalises, so both
    estimators agree on the trace for the same seed.

    Args:
        op: a square operator or dense tensor ``[P, P]``.
        num_matvecs: number of probes ``n >= 2`` (one matvec each).
        seed: seed of the private probe generator (global RNG untouched).
        block_size: probes multiplied together in one ``[P, K]`` product.

    Returns:
        TraceEstimate with ``stderr = std(z^T A z) / sqrt(n)``.

    Cost: ``num_matvecs`` matvecs in ``ceil(n / block_size)`` batched products.

    Example:
        >>> est = hutchinson_trace(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)), num_matvecs=8)
        >>> est.mean, est.stderr  # a diagonal matrix: every Rademacher probe gives the exact trace
        (10.0, 0.0)
    """
    t0 = time.perf_counter()
    A, P = _check(op, num_matvecs, block_size, "hutchinson_trace", 2)
    n = int(num_matvecs)
    samples = _quadratic_forms(A, P, 0, n, seed, block_size)
    return TraceEstimate(
        mean=float(samples.mean()), stderr=float(samples.std(unbiased=True) / math.sqrt(n)),
        num_matvecs=n, seconds=time.perf_counter() - t0,
        settings={"method": "hutchinson", "probes": "rademacher", "num_probes": n, "seed": seed,
                  "block_size": block_size},
    )


def hutchpp_trace(op: LinearOperator | Tensor, num_matvecs: int = 102, seed: int = 0,
                  block_size: int = 32) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched top subspace plus Hutchinson.

    With ``s = num_matvecs // 3`` sketch probes ``S``: ``Q = orth(A S)`` (``s`` matvecs), ``tr(Q^T A Q)``
    (``s`` matvecs), and Hutchinson with the remaining ``g = num_matvecs - 2s`` probes on
    ``(I - QQ^T) A (I - QQ^T)``. ``stderr`` is the standard error of that residual Hutchinson part (the
    sketched part is exact for the given sketch).

    Args:
        op: a square operator or dense tensor ``[P, P]``.
        num_matvecs: total budget, ``>= 4`` (so that at least two residual probes remain).
        seed: seed of the private probe generator.
        block_size: columns per batched product.

    Returns:
        TraceEstimate; ``settings`` holds ``sketch_size`` and ``num_probes``.

    Cost: exactly ``num_matvecs`` matvecs (``s`` may be capped at ``P`` with the rest going to probes).

    Example:
        >>> A = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> round(hutchpp_trace(A, num_matvecs=12).mean, 6)  # a sketch of size P = 4: exact
        103.0
    """
    t0 = time.perf_counter()
    A, P = _check(op, num_matvecs, block_size, "hutchpp_trace", 4)
    n = int(num_matvecs)
    s = min(n // 3, P)
    g = n - 2 * s
    # Sketch probes come after the residual probes in the seed's sequence so that the two never coincide.
    AS = torch.cat([matmul64(A, rademacher_probes(P, g + b0, min(block_size, s - b0), seed, A.device))
                    for b0 in range(0, s, block_size)], 1)
    Q, _ = torch.linalg.qr(AS)
    AQ = torch.cat([matmul64(A, Q[:, b0 : b0 + block_size]) for b0 in range(0, s, block_size)], 1)
    exact = float((Q * AQ).sum())
    samples = _quadratic_forms(A, P, 0, g, seed, block_size, project=Q)
    return TraceEstimate(
        mean=exact + float(samples.mean()), stderr=float(samples.std(unbiased=True) / math.sqrt(g)),
        num_matvecs=2 * s + g, seconds=time.perf_counter() - t0,
        settings={"method": "hutch++", "probes": "rademacher", "sketch_size": s, "num_probes": g,
                  "seed": seed, "block_size": block_size},
    )
