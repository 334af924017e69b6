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
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diagnostics.errors import ConfigError
from diagnostics.linalg.lanczos_basis import auto_budget, resolve_basis_dtype
from diagnostics.linalg.operator import LinearOperator, as_operator, rademacher_probes, square_dim
from diagnostics.linalg.stepped import SteppedRun

__all__ = ["TraceEstimate", "TraceRun", "hutchinson_trace", "hutchpp_trace"]


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


def _probes(P: int, start: int, count: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Probes ``start..start+count-1`` as ``[P, count]`` in ``dtype``, drawn one at a time (8P bytes of
    float64 at once, not 8P per column)."""
    Z = torch.empty(P, count, dtype=dtype, device=device)
    for c in range(count):
        Z[:, c] = rademacher_probes(P, start + c, 1, seed, device)[:, 0]
    return Z


class _OwnTime:
    """Wall time of a stepped computation, less the pauses between its calls."""

    def __init__(self) -> None:
        self.spent, self._since = 0.0, time.perf_counter()

    def pause(self) -> None:
        self.spent += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()

    def total(self) -> float:
        return self.spent + time.perf_counter() - self._since


def _apply(A: LinearOperator, V: Tensor) -> Tensor:
    """``A @ V`` with the product in the operator's dtype and the result in ``V``'s."""
    return (A @ V.to(A.dtype)).to(V.dtype)


def _quadratic_form_steps(A: LinearOperator, P: int, start: int, count: int, seed: int, block: int,
                          dtype: torch.dtype, clock: _OwnTime, project: Tensor | None = None,
                          ) -> Generator[None, None, Tensor]:
    """``z_j^T B z_j`` (float64) for probes ``start..start+count-1``, ``B = A`` or the deflated
    ``(I-QQ^T)A(I-QQ^T)``; pauses before each batched product."""
    values = []
    for b0 in range(0, count, block):
        Z = _probes(P, start + b0, min(block, count - b0), seed, dtype, A.device)
        if project is not None:
            Z -= project @ (project.T @ Z)
        clock.pause()
        yield
        clock.resume()
        AZ = _apply(A, Z)
        if project is not None:
            AZ -= project @ (project.T @ AZ)
        values.append((Z * AZ).sum(0, dtype=torch.float64).cpu())
    return torch.cat(values)


def _drive(steps: Generator[None, None, TraceEstimate]) -> TraceEstimate:
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def _plan(P: int, sketch: int, block_size: int, itemsize: int, max_memory: int | None, device: torch.device,
          what: str) -> tuple[int, int, int, str]:
    """``(sketch size, block, budget, source)`` within the memory: the sketch and its orthogonal basis
    (``2 s`` P-vectors) and a block's probes and products (``3 b``, one spare) must fit."""
    if max_memory is not None and (isinstance(max_memory, bool) or int(max_memory) <= 0):
        raise ConfigError(f"{what}: max_memory must be a positive number of bytes, got {max_memory!r}")
    budget = auto_budget(device) if max_memory is None else int(max_memory)
    source = "automatic budget" if max_memory is None else "max_memory"
    fit = budget // (P * itemsize)
    block = max(1, min(int(block_size), (fit - 2 * sketch) // 3 if sketch else fit // 3))
    if fit < 3:
        if max_memory is not None:
            raise ConfigError(f"{what}: max_memory={budget} bytes cannot hold one probe, its product and a spare "
                              f"({P * itemsize} bytes each, P={P}): give max_memory >= {3 * P * itemsize}")
        return 0, 1, budget, source  # the smallest computation there is, over the automatic budget
    if sketch and 2 * sketch + 3 * block > fit:
        sketch = max(0, (fit - 3 * block) // 2)
    return sketch, block, budget, source


def _hutchinson_steps(op: LinearOperator | Tensor, num_matvecs: int, seed: int, block_size: int,
                      max_memory: int | None, basis_dtype: torch.dtype | None) -> Generator[None, None, TraceEstimate]:
    clock = _OwnTime()
    A, P = _check(op, num_matvecs, block_size, "hutchinson_trace", 2)
    n = int(num_matvecs)
    dtype = resolve_basis_dtype(A.dtype, basis_dtype, "hutchinson_trace")
    _, block, budget, source = _plan(P, 0, block_size, _itemsize(dtype), max_memory, A.device, "hutchinson_trace")
    samples = yield from _quadratic_form_steps(A, P, 0, n, seed, block, dtype, clock)
    return TraceEstimate(
        mean=float(samples.mean()), stderr=float(samples.std(unbiased=True) / math.sqrt(n)),
        num_matvecs=n, seconds=clock.total(),
        settings={"method": "hutchinson", "probes": "rademacher", "num_probes": n, "seed": seed,
                  "block_size": block, "dtype": str(dtype).removeprefix("torch."), "memory_budget": budget,
                  "memory_from": source},
    )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def hutchinson_trace(op: LinearOperator | Tensor, num_matvecs: int = 100, seed: int = 0,
                     block_size: int = 32, *, max_memory: int | None = None,
                     basis_dtype: torch.dtype | None = None) -> TraceEstimate:
    """Hutchinson's estimate ``(1/n) sum_j z_j^T A z_j`` with Rademacher ``z_j``, mean ± standard error.

    Probe ``j`` of a seed is the same Rademacher vector that :func:`spectral_density` normalises, so both
    estimators agree on the trace for the same seed.

    Args:
        op: a square operator or dense tensor ``[P, P]``.
        num_matvecs: number of probes ``n >= 2`` (one matvec each).
        seed: seed of the private probe generator (global RNG untouched).
        block_size: probes multiplied together in one ``[P, K]`` product (fewer when ``max_memory``
            cannot hold three ``[P, K]`` blocks).
        max_memory: bytes for the probes and products (default 2 GiB, or half of a CUDA device's free
            memory when less).
        basis_dtype: the probes' dtype, ``torch.float32`` or ``torch.float64``; default the operator's
            (float32 for half precision). Each ``z^T A z`` is summed in float64.

    Returns:
        TraceEstimate with ``stderr = std(z^T A z) / sqrt(n)``.

    Cost: ``num_matvecs`` matvecs in ``ceil(n / block_size)`` batched products.

    Example:
        >>> est = hutchinson_trace(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64)), num_matvecs=8)
        >>> est.mean, est.stderr  # a diagonal matrix: every Rademacher probe gives the exact trace
        (10.0, 0.0)
    """
    return _drive(_hutchinson_steps(op, num_matvecs, seed, block_size, max_memory, basis_dtype))


def hutchpp_trace(op: LinearOperator | Tensor, num_matvecs: int = 102, seed: int = 0,
                  block_size: int = 32, *, max_memory: int | None = None,
                  basis_dtype: torch.dtype | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): exact trace on a sketched top subspace plus Hutchinson.

    With ``s = num_matvecs // 3`` sketch probes ``S``: ``Q = orth(A S)`` (``s`` matvecs), ``tr(Q^T A Q)``
    (``s`` matvecs), and Hutchinson with the remaining ``g = num_matvecs - 2s`` probes on
    ``(I - QQ^T) A (I - QQ^T)``. ``stderr`` is the standard error of that residual Hutchinson part (the
    sketched part is exact for the given sketch).

    Memory: the sketch and its orthogonal basis are ``2 s`` vectors of P numbers in ``basis_dtype``, and a
    block of probes with its products three ``[P, block]`` tensors; within ``max_memory`` (default 2 GiB,
    or half of a CUDA device's free memory when less) the block shrinks first, then the sketch, down to
    none (plain Hutchinson with all ``num_matvecs`` probes). ``settings`` say what ran.

    Args:
        op: a square operator or dense tensor ``[P, P]``.
        num_matvecs: total budget, ``>= 4`` (so that at least two residual probes remain).
        seed: seed of the private probe generator.
        block_size: columns per batched product.
        max_memory: bytes for the sketch, its basis and a block (see above).
        basis_dtype: ``torch.float32`` or ``torch.float64``; default the operator's dtype (float32 for
            half precision). Sums are taken in float64.

    Returns:
        TraceEstimate; ``settings`` holds ``sketch_size``, ``num_probes``, ``block_size``, ``dtype`` and
        ``memory_budget``.

    Cost: exactly ``num_matvecs`` matvecs (``s`` may be capped at ``P`` with the rest going to probes).

    Example:
        >>> A = torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> round(hutchpp_trace(A, num_matvecs=12).mean, 6)  # a sketch of size P = 4: exact
        103.0
    """
    return _drive(_hutchpp_steps(op, num_matvecs, seed, block_size, max_memory, basis_dtype))


def _hutchpp_steps(op: LinearOperator | Tensor, num_matvecs: int, seed: int, block_size: int,
                   max_memory: int | None, basis_dtype: torch.dtype | None
                   ) -> Generator[None, None, TraceEstimate]:
    """:func:`hutchpp_trace` as a generator that pauses before each batched product; ``seconds`` counts
    its own time only."""
    clock = _OwnTime()
    A, P = _check(op, num_matvecs, block_size, "hutchpp_trace", 4)
    n = int(num_matvecs)
    dtype = resolve_basis_dtype(A.dtype, basis_dtype, "hutchpp_trace")
    s, block, budget, source = _plan(P, min(n // 3, P), block_size, _itemsize(dtype), max_memory, A.device,
                                     "hutchpp_trace")
    g = n - 2 * s
    exact = 0.0
    Q: Tensor | None = None
    if s:
        # Sketch probes come after the residual probes in the seed's sequence so that the two never coincide.
        AS = torch.empty(P, s, dtype=dtype, device=A.device)
        for b0 in range(0, s, block):
            b1 = min(s, b0 + block)
            S = _probes(P, g + b0, b1 - b0, seed, dtype, A.device)
            clock.pause()
            yield
            clock.resume()
            AS[:, b0:b1] = _apply(A, S)
            del S
        Q = torch.linalg.qr(AS).Q
        del AS
        for b0 in range(0, s, block):
            clock.pause()
            yield
            clock.resume()
            Qb = Q[:, b0 : b0 + block]
            exact += float((Qb * _apply(A, Qb)).sum(dtype=torch.float64))
    samples = yield from _quadratic_form_steps(A, P, 0, g, seed, block, dtype, clock, project=Q)
    return TraceEstimate(
        mean=exact + float(samples.mean()), stderr=float(samples.std(unbiased=True) / math.sqrt(g)),
        num_matvecs=2 * s + g, seconds=clock.total(),
        settings={"method": "hutch++" if s else "hutchinson (no sketch fits max_memory)", "probes": "rademacher",
                  "sketch_size": s, "num_probes": g, "seed": seed, "block_size": block,
                  "dtype": str(dtype).removeprefix("torch."), "memory_budget": budget, "memory_from": source},
    )


class TraceRun(SteppedRun[TraceEstimate]):
    """:func:`hutchpp_trace` in slices: each :meth:`advance` runs batched products until the estimate is
    complete or that call's limit is reached.

    Sliced or not, the arithmetic is that of one :func:`hutchpp_trace` call with the same arguments.
    Between calls the run holds its sketch (within ``max_memory``) and the operator, which must not change
    meanwhile.

    Example:
        >>> run = TraceRun(torch.diag(torch.tensor([100.0, 1.0, 1.0, 1.0], dtype=torch.float64)), 12, block_size=1)
        >>> while run.advance(max_steps=1) is None:
        ...     pass
        >>> round(run.result.mean, 6)
        103.0
    """

    def __init__(self, op: LinearOperator | Tensor, num_matvecs: int = 102, seed: int = 0, block_size: int = 32, *,
                 max_memory: int | None = None, basis_dtype: torch.dtype | None = None) -> None:
        """Validate the arguments (no product yet). Raises as :func:`hutchpp_trace`."""
        super().__init__(_hutchpp_steps(op, num_matvecs, seed, block_size, max_memory, basis_dtype), "TraceRun")
