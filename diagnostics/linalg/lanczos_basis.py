"""How large a Lanczos basis is: the dtype it is kept in and the number of vectors the memory allows.

Split from :mod:`diagnostics.linalg.lanczos`, which uses it; the rules are documented on
:func:`diagnostics.linalg.lanczos.lanczos` (``max_steps``, ``max_memory``, ``basis_dtype``).
"""

from __future__ import annotations

import torch

from diagnostics._memory import sole_holder
from diagnostics.errors import ConfigError

__all__ = ["DEFAULT_BASIS_BYTES", "MIN_SPARE_VECTORS", "WORK_VECTORS", "BasisWorkspace", "auto_budget",
           "basis_size", "resolve_basis_dtype"]

#: Memory for the basis and its workspace when neither ``max_steps`` nor ``max_memory`` is given (bytes).
DEFAULT_BASIS_BYTES = 2 << 30
#: The automatic basis size never goes below the wanted count plus this: a thick restart then keeps the
#: wanted Ritz vectors and half of these, and each cycle adds the other half.
MIN_SPARE_VECTORS = 8
#: P-vectors of workspace beside the basis buffer (frontier, product, its orthogonalised copy, one spare),
#: counted against ``max_memory``.
WORK_VECTORS = 4

def resolve_basis_dtype(op_dtype: torch.dtype, basis_dtype: torch.dtype | None,
                        name: str = "lanczos") -> torch.dtype:
    """The basis dtype: ``basis_dtype`` when given (float32 or float64), else the operator's (float32 for
    half-precision operators). ``name`` prefixes the error."""
    if basis_dtype is None:
        # Half-precision bases cannot be kept orthonormal to a useful accuracy.
        return op_dtype if op_dtype in (torch.float32, torch.float64) else torch.float32
    if basis_dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"{name}: basis_dtype must be torch.float32, torch.float64 or None, "
                          f"got {basis_dtype!r}")
    return basis_dtype


def auto_budget(device: torch.device) -> int:
    """:data:`DEFAULT_BASIS_BYTES`, or half of the free memory of a CUDA device when that is less."""
    budget = DEFAULT_BASIS_BYTES
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 2)
    return budget


def basis_size(P: int, count: int, max_steps: int | None, max_memory: int | None, itemsize: int,
                device: torch.device) -> tuple[int, int | None, str]:
    """The number of basis vectors, the memory budget it was fitted to, and what decided it."""
    floor = min(P, count + 1)
    per_vector = P * itemsize
    if max_steps is not None:
        cap, source = min(int(max_steps), P), "max_steps"
        if cap < floor:
            raise ConfigError(f"lanczos: max_steps={max_steps} must be at least k+1={count + 1} "
                              f"(the number of wanted eigenvalues plus one)")
    else:
        cap, source = min(P, max(2 * count + 20, 40)), "default"
    if max_memory is not None:
        if int(max_memory) <= 0:
            raise ConfigError(f"lanczos: max_memory must be a positive number of bytes, got {max_memory}")
        budget = int(max_memory)
        fit = budget // per_vector - WORK_VECTORS
        if fit < floor:
            need = (floor + WORK_VECTORS) * per_vector
            raise ConfigError(f"lanczos: max_memory={budget} bytes holds {max(fit, 0)} basis vectors of "
                              f"{per_vector} bytes (P={P}) beside {WORK_VECTORS} of workspace; the wanted "
                              f"eigenvalues need at least {floor}: give max_memory >= {need}")
        if fit < cap:
            cap, source = fit, "max_memory"
        return cap, budget, source
    if max_steps is not None:
        return cap, None, source
    budget = auto_budget(device)
    fit = budget // per_vector - WORK_VECTORS
    if fit < cap:
        cap, source = max(fit, min(P, count + MIN_SPARE_VECTORS)), "automatic budget"
    return cap, budget, source


class BasisWorkspace:
    """Memory for Lanczos bases kept from one run to the next, for a caller that runs Lanczos again and
    again (the Monitor's curvature probes, one analysis over many checkpoints).

    A basis is ``m x P`` values written one row per product. Allocated afresh, every row is new memory
    that the operating system maps and zeroes at its first write; on a CPU at P ~ 1M that costs about a
    quarter of the rest of the bookkeeping. A workspace keeps the largest CPU buffer asked of it, up to
    ``max_bytes``, and hands later runs a view of it. Bases on another device are allocated for each
    run and never kept: CUDA's caching allocator already reuses freed memory without page faults, and
    memory held here would be out of the training's reach between runs.

    One run at a time uses it: while a view of the kept buffer is alive (a paused
    :class:`~diagnostics.linalg.LanczosRun`), :meth:`take` allocates afresh, so two runs never share
    memory. A basis larger than ``max_bytes`` is never kept. Memory: at most ``max_bytes`` between runs,
    until :meth:`clear`.
    """

    #: The default of ``max_bytes``: half the automatic basis budget (:data:`DEFAULT_BASIS_BYTES`).
    DEFAULT_MAX_BYTES = DEFAULT_BASIS_BYTES // 2

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ConfigError(f"BasisWorkspace: max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._buffer: torch.Tensor | None = None
        #: How many bases were handed out of kept memory (for tests and benchmarks).
        self.reuses = 0

    @property
    def nbytes(self) -> int:
        """Bytes kept between runs (0 when empty)."""
        b = self._buffer
        return 0 if b is None else b.numel() * b.element_size()

    def take(self, rows: int, P: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """A ``[rows, P]`` tensor for a basis (uninitialised) and whether it is kept memory reused.

        Reuses the kept buffer when no view of it is alive and it has the dtype, the device and at least
        ``rows * P`` values; else allocates, and keeps the new buffer if it is within ``max_bytes``.
        Cost: an allocation at most."""
        need = rows * P
        b = self._buffer
        if b is not None and sole_holder(b):
            if b.dtype == dtype and b.device == torch.device(device) and b.numel() >= need:
                self.reuses += 1
                return b[:need].view(rows, P), True
            self._buffer = b = None  # freed before the new one is allocated: the peak is one buffer
        fresh = torch.empty(need, dtype=dtype, device=device)
        if self._buffer is None and fresh.device.type == "cpu" and need * fresh.element_size() <= self.max_bytes:
            self._buffer = fresh
        return fresh.view(rows, P), False

    def clear(self) -> None:
        """Drop the kept buffer (a run still using it keeps that memory alive until it ends)."""
        self._buffer = None
