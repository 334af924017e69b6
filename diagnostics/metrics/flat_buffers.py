"""Flat copies of the parameters, reused from one monitored step to the next.

The step context copies the trainable parameters into one flat tensor (the weight norms and the snapshot
before ``optimizer.step()``) and forms the update as another; a Monitor whose ``cheap`` diagnostics run
every step needs both at every step. Allocated afresh, a tensor of that size is mapped by the operating
system page by page at its first write: at GPT-2 small's size (124M parameters, 0.5 GB) that took longer
than the copy itself (benchmarks/RESULTS.md, "The parameters' flat copies kept between steps"). CUDA's
caching allocator keeps such blocks anyway; this keeps them on the CPU too, as long as every monitored
step uses them.
"""

from __future__ import annotations

import torch

from diagnostics._memory import sole_holder

__all__ = ["FlatBufferPool"]


class FlatBufferPool:
    """Buffers lent to one step's context and taken back when the step is done.

    :meth:`take` gives a 1-D tensor of the size, dtype and device asked for: one kept from an earlier step
    when there is one, else a new one. :meth:`give_back` keeps a buffer for the next step, but only if no
    view of it survives (a diagnostic may have kept one in its state). :meth:`new_step`, at the start of
    each monitored step, frees what the previous step did not use, so the memory is held only while every
    step needs it. Memory: at most :attr:`MAX_KEPT` copies of the parameters between steps.
    """

    MAX_KEPT = 2

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []
        self._used = False

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements (uninitialised)."""
        self._used = True
        for i, t in enumerate(self._kept):
            if t.numel() == numel and t.dtype == dtype and t.device == device:
                return self._kept.pop(i)
        return torch.empty(numel, dtype=dtype, device=device)

    def give_back(self, t: torch.Tensor) -> None:
        """Keep ``t`` for the next step, unless a view of it is still alive or enough are kept."""
        if len(self._kept) < self.MAX_KEPT and sole_holder(t):
            self._kept.append(t)

    def new_step(self) -> None:
        """Start a monitored step: free the buffers if the previous one did not use them."""
        if not self._used:
            self._kept.clear()
        self._used = False

    def clear(self) -> None:
        """Free every buffer (the Monitor is closing)."""
        self._kept.clear()

    @property
    def kept_bytes(self) -> int:
        """Bytes held between steps."""
        return sum(t.numel() * t.element_size() for t in self._kept)
