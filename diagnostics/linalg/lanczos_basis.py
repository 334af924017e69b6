"""How large a Lanczos basis is: the dtype it is kept in and the number of vectors the memory allows.

Split from :mod:`diagnostics.linalg.lanczos`, which uses it; the rules are documented on
:func:`diagnostics.linalg.lanczos.lanczos` (``max_steps``, ``max_memory``, ``basis_dtype``).
"""

from __future__ import annotations

import weakref

import torch

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
    again (a probe on a schedule, one per checkpoint).

    A basis is ``m x P`` values written one row per product. Allocated afresh, every row is new memory
    that the operating system maps and zeroes at its first write; on a CPU that costs about as much as the
    rest of the step's bookkeeping at P ~ 1M (CUDA's caching allocator keeps freed memory, so there it
    changes nothing). A workspace keeps the largest buffer asked of it and hands later runs a view of it.

    One run at a time holds it: :meth:`take` while the previous view is still alive (a paused
    :class:`~diagnostics.linalg.LanczosRun`) gives a fresh, unkept allocation, so two runs never share
    memory. Memory: the largest basis taken, held until :meth:`clear` or the workspace is dropped.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._lease: weakref.ref[torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held between runs (0 when empty)."""
        b = self._buffer
        return 0 if b is None else b.numel() * b.element_size()

    def take(self, rows: int, P: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """A ``[rows, P]`` tensor for a basis (uninitialised) and whether it reuses kept memory.

        Reuses the kept buffer when it is free and has the dtype, the device and at least ``rows * P``
        values; else allocates, and keeps the new buffer unless a run still holds the old one.
        Cost: an allocation at most."""
        busy = self._lease is not None and self._lease() is not None
        b = self._buffer
        if busy:
            return torch.empty(rows, P, dtype=dtype, device=device), False
        need = rows * P
        reused = b is not None and b.dtype == dtype and b.device == torch.device(device) and b.numel() >= need
        if not reused:
            self._buffer = None  # released before the new one is allocated: the peak is one buffer
            b = self._buffer = torch.empty(need, dtype=dtype, device=device)
        view = b[:need].view(rows, P)
        self._lease = weakref.ref(view)
        return view, reused

    def clear(self) -> None:
        """Release the kept buffer (a run holding a view keeps its own memory alive until it ends)."""
        self._buffer = None
        self._lease = None
