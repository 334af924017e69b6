"""How the overhead budget treats runs cut into calls (``hessian_top``): the time one call may take,
carrying an unfinished run on at the next steps, and running its readers when it ends.

A mixin of :class:`diagnostics.tracking.budget.BudgetScheduler`, whose attributes it reads and books
into (the rule and the ledger are documented there); the Monitor calls these methods in this order
within one call: ``due``, :meth:`CutRuns.carry_on`, the compute phase, :meth:`CutRuns.follow`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["CutRuns"]


class CutRuns:
    """The budget's part for resumable diagnostics (``Diagnostic.resumable``)."""

    budget: float
    window: int
    step_seconds: float | None
    sliced: frozenset[str]
    heavy: frozenset[str]
    followers: Mapping[str, str]
    runs: dict[str, int]
    _exempt_now: set[str]
    _admitted_now: set[str]
    _sync: Callable[[Any], Any] | None

    def probe_seconds(self) -> float | None:
        """Seconds one call of a resumable probe may take (``StepContext.probe_seconds``): what the budget
        allows a whole window, ``budget * window * T``, so that no step stalls for a long probe; None before
        a training step was measured, and under torch.distributed (each rank's clock would stop its run
        at another product, and the products' collectives would no longer meet)."""
        if self.step_seconds is None or self._sync is not None:
            return None
        return self.budget * self.window * self.step_seconds

    def carry_on(self, names: Sequence[str]) -> list[str]:
        """Of ``names`` (diagnostics with an unfinished run that :meth:`due` did not choose at this step),
        those that continue it at this step: all sliced ones, so a run cut into calls ends within a few
        steps, a slice per step; none at a call that runs another long probe's first or second run (one
        long probe per step). Their seconds are booked as the run's: outside the budget for a first or
        second run, as a run the ledger admitted (with the cost of a whole run) for later ones; the cost
        of the run is the sum of its calls (:meth:`account`). Call after :meth:`due`, in the same call."""
        if (self._exempt_now & self.heavy) - set(names):
            return []
        out = [n for n in names if n in self.sliced]
        for n in out:
            (self._exempt_now if self.runs.get(n, 0) <= 2 else self._admitted_now).add(n)
        return out

    def follow(self, leaders: Iterable[str]) -> list[str]:
        """The readers (``after``) of ``leaders``, runs cut into calls that ended at a carried call: they
        run at this call too, to read what their leader shares at the step, booked as their leader is.
        Call after :meth:`carry_on`, in the same call."""
        ended = set(leaders)
        out = [f for f, lead in self.followers.items() if lead in ended]
        for f in out:
            lead = self.followers[f]
            (self._exempt_now if lead in self._exempt_now else self._admitted_now).add(f)
        return out
