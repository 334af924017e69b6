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
    _followers_of: Mapping[str, tuple[str, ...]]
    runs: dict[str, int]
    _exempt_now: set[str]
    _admitted_now: set[str]
    _cut_order: dict[str, None]
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
        the one that continues its run at this step: the sliced run that was cut first, so that runs cut
        into calls end one after the other within a few steps, one slice per step (two slices at one step
        would make it twice as long); none at a call that runs another long probe's first or second run
        (one long probe per step). Its seconds are booked as the run's: outside the budget for a first or
        second run, as a run the ledger admitted (with the cost of a whole run) for later ones; the cost
        of the run is the sum of its calls (:meth:`account`). Call after :meth:`due`, in the same call."""
        if (self._exempt_now & self.heavy) - set(names):
            return []
        waiting = [n for n in names if n in self.sliced]
        if not waiting:
            return []
        first = next((n for n in self._cut_order if n in waiting), waiting[0])
        (self._exempt_now if self.runs.get(first, 0) <= 2 else self._admitted_now).add(first)
        return [first]

    def note_unfinished(self, unfinished: Iterable[str]) -> None:
        """Keep the order in which the runs now unfinished were cut (:meth:`carry_on` continues the first)."""
        now = set(unfinished)
        for n in [n for n in self._cut_order if n not in now]:
            del self._cut_order[n]
        for n in unfinished:
            self._cut_order.setdefault(n, None)

    def follow(self, leaders: Iterable[str]) -> list[str]:
        """The readers (``after``) of ``leaders``, runs cut into calls that ended at a carried call: they
        run at this call too, to read what their leader shares at the step, booked as their leader is.
        Call after :meth:`carry_on`, in the same call."""
        out = [f for lead in dict.fromkeys(leaders) for f in self._followers_of.get(lead, ())]
        for f in out:
            lead = self.followers[f]
            (self._exempt_now if lead in self._exempt_now else self._admitted_now).add(f)
        return out
