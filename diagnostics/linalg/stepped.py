"""A computation in slices: :class:`SteppedRun` drives a generator that pauses before each product and
continues it later, so a long estimate can be spread over calls (``LanczosRun``, ``DensityRun``).

The generator yields before each (possibly batched) product of its operator and returns its result; it
may answer a value sent into it (``LanczosRun.interim``). Between calls it keeps its state (its Krylov
basis), and the operator must not change meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, Generic, TypeVar

from diagnostics.errors import ConfigError

__all__ = ["SteppedRun"]

R = TypeVar("R")


class SteppedRun(Generic[R]):
    """Runs a generator of products step by step: :meth:`advance` until :attr:`result` is set."""

    def __init__(self, steps: Generator[Any, Any, R], name: str) -> None:
        """Start ``steps`` up to its first product (none is run yet). ``name`` appears in errors."""
        self._steps: Generator[Any, Any, R] | None = steps
        self._name = name
        #: The final result once the run has ended, else None.
        self.result: R | None = None
        self._step()

    @property
    def done(self) -> bool:
        """Whether the run has ended."""
        return self.result is not None

    def _step(self) -> None:
        try:
            next(self._steps)
        except StopIteration as end:
            self.result, self._steps = end.value, None

    def advance(self, max_steps: int | None = None, max_seconds: float | None = None) -> R | None:
        """Continue the run: the result once it has ended, else None after ``max_steps`` products or after
        the product that passes ``max_seconds`` (at least one product per call).

        Cost: the products it runs and their bookkeeping.
        """
        if self.result is None and self._steps is None:
            raise ConfigError(f"{self._name}: advance() after close(); start a new run")
        start, products = time.perf_counter(), 0
        while self.result is None:
            if products and ((max_steps is not None and products >= max_steps)
                             or (max_seconds is not None and time.perf_counter() - start >= max_seconds)):
                return None
            self._step()
            products += 1
        return self.result

    def close(self) -> None:
        """Free the state of an unfinished run (it cannot be advanced after)."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
