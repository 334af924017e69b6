"""Lanczos in slices: :class:`LanczosRun` stops between products and continues later, on the same basis.

Split from :mod:`diagnostics.linalg.lanczos`, whose generator it drives; the method and its arguments are
documented on :func:`diagnostics.linalg.lanczos.lanczos`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diagnostics.linalg.lanczos import EigenResult, _lanczos_steps
from diagnostics.linalg.lanczos_basis import BasisWorkspace
from diagnostics.linalg.operator import LinearOperator
from diagnostics.linalg.stepped import SteppedRun

__all__ = ["LanczosRun"]


class LanczosRun(SteppedRun[EigenResult]):
    """:func:`lanczos` in slices: each :meth:`advance` runs products until the eigenpairs are found or
    that call's limit is reached; the next call continues the same Krylov basis.

    Sliced or not, the arithmetic is the same: a run advanced one product at a time returns exactly what
    one :func:`lanczos` call with the same arguments returns. Between calls the run holds its basis
    (``max_memory``) and the operator, which must not change meanwhile (an operator on a snapshot of the
    parameters, for a probe spread over training steps). ``max_matvecs`` caps the whole run.

    Example:
        >>> run = LanczosRun(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)), k=2, tol=1e-10)
        >>> while run.advance(max_matvecs=3) is None:
        ...     pass
        >>> [round(x, 8) for x in run.result.eigenvalues.tolist()]
        [10.0, 9.0]
    """

    def __init__(
        self,
        op: LinearOperator | Tensor,
        k: int = 1,
        which: str = "LA",
        tol: float = 1e-6,
        max_steps: int | None = None,
        v0: Tensor | None = None,
        seed: int = 0,
        return_eigenvectors: bool = True,
        max_matvecs: int | None = None,
        criterion: str = "residual",
        *,
        max_memory: int | None = None,
        basis_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
        workspace: BasisWorkspace | None = None,
    ) -> None:
        """Validate the arguments and draw the start vector (no product yet). Raises as :func:`lanczos`."""
        super().__init__(_lanczos_steps(
            op, k, which, tol, max_steps, v0, seed, return_eigenvectors, max_matvecs, None,
            criterion=criterion, max_memory=max_memory, basis_dtype=basis_dtype, basis_device=basis_device,
            workspace=workspace),
            "LanczosRun")

    def advance(self, max_matvecs: int | None = None, max_seconds: float | None = None) -> EigenResult | None:
        """Continue the run: the result once it has ended, else None after ``max_matvecs`` products or
        after the product that passes ``max_seconds`` (at least one product per call).

        Cost: the products it runs and their bookkeeping, as in :func:`lanczos`.
        """
        return super().advance(max_matvecs, max_seconds)

    def interim(self) -> EigenResult:
        """The eigenpairs found so far, without eigenvectors (``settings["stop"]`` is ``"paused"``), or
        the final result. Cost: O(k) on the host; the run continues as if it had not been asked."""
        if self.result is not None or self._steps is None:
            return self.result
        return self._steps.send("interim")
