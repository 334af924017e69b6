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
from diagnostics.linalg.lanczos_basis import BasisWorkspace, auto_budget, resolve_basis_dtype
from diagnostics.linalg.operator import LinearOperator, as_operator, rademacher_probes, square_dim
from diagnostics.linalg.stepped import SteppedRun

__all__ = ["DensityPlan", "DensityRun", "SpectralDensity", "density_plan", "spectral_density"]


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


#: P-vectors of workspace per probe beside its basis (the product, its orthogonalised copy, one spare),
#: counted against ``max_memory``.
DENSITY_WORK_VECTORS = 3
#: The fewest basis vectors a probe can run with: the last two Lanczos vectors of the three-term recurrence.
MIN_WINDOW = 2


@dataclass(frozen=True)
class DensityPlan:
    """How a quadrature fits its memory: probes advanced together and basis vectors kept per probe."""

    group: int  #: probes advanced together (one batched product per Lanczos step of the group)
    window: int  #: basis vectors kept per probe (``m``: full reorthogonalisation; fewer: the latest ones)
    budget: int  #: the bytes the plan was fitted to
    source: str  #: "max_memory" or "automatic budget"
    within_budget: bool  #: False when even the smallest run (two vectors, one probe) exceeds the budget

    def basis_bytes(self, P: int, itemsize: int) -> int:
        """Bytes of one group's basis buffer."""
        return self.group * self.window * P * itemsize


def density_plan(P: int, num_probes: int, m: int, itemsize: int, max_memory: int | None,
                 device: torch.device) -> DensityPlan:
    """The largest probe group whose full bases fit the memory, else one probe with the latest vectors
    that fit (a window of at least two).

    The memory is ``max_memory`` bytes, or the automatic budget (2 GiB, or half of a CUDA device's free
    memory when less) when it is None. Raises ConfigError when ``max_memory`` cannot hold one probe's two
    vectors and its workspace; the automatic budget then runs that smallest plan anyway (``within_budget``
    False), since no smaller computation exists.
    """
    if max_memory is not None and (isinstance(max_memory, bool) or int(max_memory) <= 0):
        raise ConfigError(f"spectral_density: max_memory must be a positive number of bytes, got {max_memory!r}")
    budget = auto_budget(device) if max_memory is None else int(max_memory)
    source = "automatic budget" if max_memory is None else "max_memory"
    per_vector = P * itemsize
    group = min(num_probes, budget // ((m + DENSITY_WORK_VECTORS) * per_vector))
    if group >= 1:
        return DensityPlan(group, m, budget, source, True)
    window = budget // per_vector - DENSITY_WORK_VECTORS
    if window >= MIN_WINDOW:
        return DensityPlan(1, min(window, m), budget, source, True)
    if max_memory is not None:
        need = (MIN_WINDOW + DENSITY_WORK_VECTORS) * per_vector
        raise ConfigError(f"spectral_density: max_memory={budget} bytes cannot hold one probe's {MIN_WINDOW} "
                          f"Lanczos vectors and {DENSITY_WORK_VECTORS} of workspace ({per_vector} bytes each, "
                          f"P={P}): give max_memory >= {need}")
    return DensityPlan(1, min(MIN_WINDOW, m), budget, source, False)


def spectral_density(op: LinearOperator | Tensor, num_probes: int = 4, steps: int = 32,
                     seed: int = 0, *, max_memory: int | None = None,
                     basis_dtype: torch.dtype | None = None,
                     workspace: BasisWorkspace | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral measure of a symmetric operator.

    Runs ``m = min(steps, P)`` Lanczos steps from each normalised Rademacher probe ``z_j / sqrt(P)``,
    the probes of a group advancing together in one ``[P, group]`` product per step. Probe ``j`` is the
    same vector :func:`hutchinson_trace` uses for the same seed.

    Memory decides the grouping and the reorthogonalisation (:func:`density_plan`): as many probes as
    fit with their whole basis advance together, each new vector orthogonalised twice against its
    probe's basis (full reorthogonalisation); when not even one probe's ``m`` vectors fit, a probe keeps
    only its latest vectors that fit and orthogonalises against those (at least the two of the three-term
    recurrence). Without full reorthogonalisation converged Ritz values reappear as copies, but the
    quadrature measure stays accurate: the copies share the weight of the eigenvalue they repeat
    (Greenbaum 1989; Chen, Trogdon, Ubaru 2021); ``tests/linalg/test_linalg_slq_memory.py`` measures it.

    Args:
        op: a symmetric ``[P, P]`` operator or dense tensor.
        num_probes: number of probes ``>= 1``.
        steps: Lanczos steps per probe ``>= 1``.
        seed: seed of the private probe generator (global RNG untouched).
        max_memory: bytes for the bases and their workspace, ``group * (window + 3) * P * itemsize``;
            default: 2 GiB, or half of a CUDA device's free memory when less.
        basis_dtype: ``torch.float32`` or ``torch.float64``; default the operator's dtype (float32 for
            half-precision operators).
        workspace: a :class:`~diagnostics.linalg.BasisWorkspace` whose kept memory holds the probe groups'
            bases, kept for the next call; None: the groups of this call share one buffer, freed at its end.

    Returns:
        SpectralDensity with ``nodes`` and ``weights`` of shape ``[num_probes, m]``; its ``settings``
        record ``probe_group``, ``basis_vectors``, ``reorthogonalization``, ``basis_dtype``,
        ``basis_bytes``, ``memory_budget``, ``memory_from`` and ``groups_in_kept_memory`` (the probe groups
        whose basis reused memory written before).

    Cost: ``num_probes * m`` matvecs in ``ceil(num_probes / group) * m`` batched products; per step two
    passes over the kept basis.

    Raises:
        ConfigError: ``num_probes`` or ``steps`` below 1, a bad ``basis_dtype``, or ``max_memory`` below
            what one probe's two vectors and workspace need.

    Example:
        >>> sd = spectral_density(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 2, 3)
        >>> sorted(round(x, 10) for x in sd.nodes[0].tolist()), round(sd.trace()[0], 10)
        ([1.0, 2.0, 3.0], 6.0)
    """
    steps_ = _slq_steps(op, num_probes, steps, seed, max_memory, basis_dtype, workspace)
    while True:
        try:
            next(steps_)
        except StopIteration as end:
            return end.value


class DensityRun(SteppedRun[SpectralDensity]):
    """:func:`spectral_density` in slices: each :meth:`advance` runs batched products (one per Lanczos
    step of a probe group) until the quadrature is complete or that call's limit is reached.

    Sliced or not, the arithmetic is the same as one :func:`spectral_density` call with the same
    arguments. Between calls the run holds its current group's basis (within ``max_memory``) and the
    operator, which must not change meanwhile.

    Example:
        >>> run = DensityRun(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), 2, 3)
        >>> while run.advance(max_steps=1) is None:
        ...     pass
        >>> round(run.result.trace()[0], 10)
        6.0
    """

    def __init__(self, op: LinearOperator | Tensor, num_probes: int = 4, steps: int = 32, seed: int = 0, *,
                 max_memory: int | None = None, basis_dtype: torch.dtype | None = None,
                 workspace: BasisWorkspace | None = None) -> None:
        """Validate the arguments and draw the first probes (no product yet). Raises as
        :func:`spectral_density`."""
        super().__init__(_slq_steps(op, num_probes, steps, seed, max_memory, basis_dtype, workspace),
                         "DensityRun")


def _reorthogonalisation(plan: DensityPlan, m: int) -> str:
    if plan.window >= m:
        return "full"
    return f"against the latest {plan.window} vectors"


def _slq_steps(op: LinearOperator | Tensor, num_probes: int, steps: int, seed: int,
               max_memory: int | None = None, basis_dtype: torch.dtype | None = None,
               workspace: BasisWorkspace | None = None) -> Generator[None, None, SpectralDensity]:
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
    dtype = resolve_basis_dtype(A.dtype, basis_dtype, "spectral_density")
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = density_plan(P, n, m, itemsize, max_memory, device)
    alpha = torch.zeros(n, m, dtype=torch.float64)
    beta = torch.zeros(n, m, dtype=torch.float64)
    length = torch.full((n,), m, dtype=torch.long)
    num_matvecs = reused = 0
    if workspace is None:  # this call's own: later groups write where the first one did, no fresh pages
        workspace = BasisWorkspace(max_bytes=plan.basis_bytes(P, itemsize))
    for first in range(0, n, plan.group):
        probes = list(range(first, min(n, first + plan.group)))
        group = _GroupLanczos(A, P, m, plan.window, dtype, probes, seed, workspace)
        reused += group.reused
        for j in range(m):
            if not group.open:
                break
            spent += time.perf_counter() - clock
            yield
            clock = time.perf_counter()
            num_matvecs += group.step(j)
        group.store(alpha, beta, length)
        del group  # its basis, before the next group's is allocated
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
                  "reorthogonalization": _reorthogonalisation(plan, m), "probe_group": plan.group,
                  "basis_vectors": plan.window, "basis_dtype": str(dtype).removeprefix("torch."),
                  "basis_bytes": plan.basis_bytes(P, itemsize), "memory_budget": plan.budget,
                  "memory_from": plan.source, "within_memory_budget": plan.within_budget,
                  "groups_in_kept_memory": reused},
    )


class _GroupLanczos:
    """Lanczos on a group of probes advanced together, each keeping its latest ``window`` vectors (all of
    them when ``window`` is ``m``) in a ring of basis rows."""

    def __init__(self, A: LinearOperator, P: int, m: int, window: int, dtype: torch.dtype,
                 probes: list[int], seed: int, workspace: BasisWorkspace) -> None:
        self.A, self.m, self.window = A, m, window
        g = len(probes)
        # Uninitialised, not zeros: rows are read only once written, and untouched memory is never paged in.
        rows, self.reused = workspace.take(g * window, P, dtype, torch.device(A.device))
        self.Q = rows.view(g, window, P)
        for row, probe in enumerate(probes):  # one float64 probe at a time: 8P bytes of temporary memory
            self.Q[row, 0] = rademacher_probes(P, probe, 1, seed, A.device)[:, 0].div_(math.sqrt(P))
        self.probes = probes
        self.alpha = torch.zeros(g, m, dtype=torch.float64)
        self.beta = torch.zeros(g, m, dtype=torch.float64)
        self.length = torch.full((g,), m, dtype=torch.long)
        self.active = torch.ones(g, dtype=torch.bool)

    @property
    def open(self) -> bool:
        """Whether any probe of the group still needs a step."""
        return bool(self.active.any())

    def step(self, j: int) -> int:
        """Lanczos step ``j`` of the active probes: one batched product; returns the matvecs used."""
        idx = self.active.nonzero().flatten()
        # While every probe is active (the usual case) the basis is a view: no per-step gather copy.
        every = idx.numel() == self.Q.shape[0]
        row = j % self.window
        V = self.Q[:, row] if every else self.Q[idx, row]  # [a, P]
        # Rows contiguous: the batched products below are several times slower on a transposed view.
        W = (self.A @ V.T.to(self.A.dtype)).T.to(self.Q.dtype).contiguous()
        self.alpha[idx, j] = torch.linalg.vecdot(V, W).double().cpu()
        if j + 1 == self.m:
            return idx.numel()
        w_norm = W.norm(dim=1)
        filled = min(j + 1, self.window)  # in a ring every row is filled once j + 1 >= window
        basis = self.Q[:, :filled] if every else self.Q[idx, :filled]  # [a, filled, P]
        # Probe by probe: a batched bmm over [a, filled, P] ran 6x slower than a loop of matrix-vector
        # products on the CPU (benchmarks/RESULTS.md, "Spectral density within a memory budget").
        for i in range(W.shape[0]):
            w, q = W[i], basis[i]
            for _ in range(2):  # reorthogonalisation against the kept vectors, twice
                w.addmv_(q.T, torch.mv(q, w), alpha=-1)
        b = W.norm(dim=1)
        closed = b <= 1e-12 * w_norm
        nxt = (j + 1) % self.window
        if not bool(closed.any()):
            self.beta[idx, j] = b.double().cpu()
            if every:
                torch.div(W, b[:, None], out=self.Q[:, nxt])
            else:
                self.Q[idx, nxt] = W / b[:, None]
            return idx.numel()
        # The Krylov space is invariant for the closed probes: their quadrature is exact with j+1 nodes.
        closed_cpu = closed.cpu()  # idx, length and active live on the CPU
        self.length[idx[closed_cpu]] = j + 1
        self.active[idx[closed_cpu]] = False
        open_ = ~closed
        self.beta[idx[~closed_cpu], j] = b[open_].double().cpu()
        self.Q[idx[~closed_cpu].to(self.Q.device), nxt] = W[open_] / b[open_, None]
        return idx.numel()

    def store(self, alpha: Tensor, beta: Tensor, length: Tensor) -> None:
        """Copy the group's coefficients and Krylov lengths into the rows of its probes."""
        rows = torch.tensor(self.probes)
        alpha[rows], beta[rows], length[rows] = self.alpha, self.beta, self.length
