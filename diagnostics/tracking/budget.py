"""The overhead budget: run the expensive diagnostics as often as a share of the training time allows.

``Monitor(..., budget=0.05)`` keeps the monitor's time at most 5% of the training time. The Monitor
reports to a :class:`BudgetScheduler` when each of its calls starts and ends, the time its update phase
takes between calls, and what each diagnostic cost at a step; the scheduler keeps exponential moving
averages of

* ``T``: training seconds per step (wall time between two calls of the Monitor, less the monitor's own
  time in between: its update phase, and its diagnostics' hooks on the training forward, which count
  as the cost of the diagnostic they belong to; divided by the steps between them);
* ``F``: the fixed overhead per step: everything the monitor spends that the budget does not schedule
  (the every-step diagnostics, isolation, the commit);
* ``c_d``: the cost of one run of each scheduled diagnostic ``d``.

The rate left for the scheduled diagnostics, ``A = budget * T - F`` seconds per step, is split in equal
shares ``a_d`` (a diagnostic that can run at every step on less than its share hands the rest back, and
the rest is split again). With ``r = c_d / a_d``, ``d`` is due once the steps since its last run reach

    I_d = 1                                  if r <= 1
    I_d = ceil(r (L - 1) / (L - r))          otherwise, L = max(window, 2 r)

the smallest gap for which ``ceil(n / I_d)`` runs in any ``n >= L`` consecutive steps cost at most
``a_d * T * n``: runs at integer steps make a window hold one run more than ``n / I_d`` in the worst
case, and the gap pays for it. The gaps alone leave windows over the budget where a costly run meets the
cheaper ones' runs, so a run due by its gap runs only when :class:`~.budget_window.WindowLedger` has room
for its estimated cost: every window of ``window`` (200) or more steps ending at the step stays within the
budget. A run turned away keeps its turn (the others wait behind it); one costlier than any window can pay
runs once the window holds no other such run (its gap keeps its average within the budget over ``2 r``
steps). So over any window of ``window`` or more steps the amortised overhead, ``F`` plus the scheduled
runs, stays within the budget up to the error of the cost estimates, as long as ``F`` fits in it.

``F`` is made to fit: the every-step diagnostics whose ``every`` was not given
(:attr:`BudgetScheduler.thinned`) may take at most :data:`EVERY_STEP_SHARE` of the budget. From the
measured fixed part of a call that runs them (``F_with``) and of one that does not (``F_without``), both
without the diagnostics ``every=`` pins, they run together every ``s`` steps, the smallest ``s`` with
``(F_with + (s - 1) F_without) / s <= EVERY_STEP_SHARE * budget * T``, at most :data:`MAX_STRIDE`
(:meth:`BudgetScheduler.stride`).

A run's cost is the second run's measurement, then a moving average: the first run carries one-time work (a cold
start, an extra forward before one was observed, first-call imports).

Besides the rule, and not limited by the budget: each scheduled diagnostic's first run comes in the first
steps (a short run shows every signal), the long probes (curvature, per-sample gradients, a default
schedule of 100 steps or more) one per step in the order of the list so that no step stalls for all of
them, the others at the first step; its second run comes at most ``second_after`` (100) steps later; a
diagnostic built with an ``every`` other than its default runs at least that often. Two scheduled
diagnostics that cannot run at every step never share a step when one can wait: of those due, the most
overdue runs and the others follow on the next steps. A diagnostic whose ``after`` names a scheduled one
runs with it (it reads what that one shares at the step), and its cost counts towards that one's.

Every input to a decision is a measured time or a step number: no random numbers. Under torch.distributed
rank 0's decision is broadcast (the ``sync`` callable), so every rank runs the same diagnostics.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from diagnostics.metrics.base import Diagnostic
from diagnostics.store.records import Record
from diagnostics.tracking.budget_cut import CutRuns
from diagnostics.tracking.budget_select import (
    DEFAULT_BUDGET,
    budgeted,
    explicit_names,
    resolve_budget,
    scheduled_names,
)
from diagnostics.tracking.budget_window import WindowLedger

__all__ = [
    "DEFAULT_BUDGET",
    "EVERY_STEP_SHARE",
    "MAX_STRIDE",
    "SECOND_AFTER",
    "STATE_KEY",
    "WINDOW",
    "BudgetScheduler",
    "budgeted",
    "explicit_names",
    "resolve_budget",
    "scheduled_names",
    "timed_call",
    "timed_work",
]

#: Steps over which the amortised overhead is held within the budget.
WINDOW = 200
#: The second run of a scheduled diagnostic comes at most this many steps after its first.
SECOND_AFTER = 100
#: Key of the scheduler's state in ``Monitor.state_dict()`` (no diagnostic name has a dot).
STATE_KEY = "monitor.budget"
#: The share of the budget the every-step diagnostics may take before they are thinned (the rest is the
#: scheduled probes').
EVERY_STEP_SHARE = 0.5
#: The every-step diagnostics run at least every this many steps, whatever the budget.
MAX_STRIDE = 10

# Step times move slowly and are sampled at every step; a diagnostic's cost is sampled only when it runs.
_STEP_SMOOTHING = 0.05
_COST_SMOOTHING = 0.3
_HEAVY = frozenset({"curvature", "per_sample_grads"})
# Stands for the thinned diagnostics in rank 0's broadcast decision (no diagnostic name has a dot).
_THINNED_TOKEN = "monitor.every_step"


class BudgetScheduler(CutRuns):
    """Decides at each step which scheduled diagnostics run, from measured times (see the module docstring).

    Args:
        budget: monitor time / training time, in (0, 1].
        diagnostics: the Monitor's diagnostics (in run order).
        explicit: names whose schedule ``every=`` fixes.
        window: steps over which the amortised overhead is held within the budget.
        second_after: the longest gap between a diagnostic's first and second runs.
        sync: ``sync(names) -> names``: rank 0's decision on every rank (None: one process).
        clock: seconds, monotonic (``time.perf_counter``; tests give a fake one).
    """

    def __init__(
        self,
        budget: float,
        diagnostics: Sequence[Diagnostic],
        explicit: set[str] | frozenset[str] = frozenset(),
        *,
        window: int = WINDOW,
        second_after: int = SECOND_AFTER,
        sync: Callable[[list[str]], list[str]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self._intervals_memo: tuple[Any, dict[str, float]] | None = None
        self.budget = float(budget)
        self.window = int(window)
        self.second_after = int(second_after)
        self._sync = sync
        names = scheduled_names(diagnostics, set(explicit))
        by_name = {d.name: d for d in diagnostics}
        #: follower -> the scheduled diagnostic it runs with.
        self.followers: dict[str, str] = {}
        for n in names:
            lead = next((a for a in getattr(by_name[n], "after", ()) or () if a in names and a != n), None)
            if lead is not None:
                self.followers[n] = lead
        for n, lead in list(self.followers.items()):
            while lead in self.followers:  # a chain of followers runs with its root
                lead = self.followers[lead]
            self.followers[n] = lead
        self.scheduled: frozenset[str] = frozenset(names)
        self.leaders: list[str] = [n for n in names if n not in self.followers]
        self._followers_of = {n: tuple(f for f, lead in self.followers.items() if lead == n) for n in self.leaders}
        # A diagnostic built with another ``every`` than its class's runs at least that often.
        self.max_gap: dict[str, int] = {
            n: by_name[n].every for n in self.leaders if by_name[n].every != type(by_name[n]).default_every
        }
        #: Scheduled diagnostics taken for long probes until measured: curvature, per-sample gradients, or
        #: a default schedule of 100 steps or more. Their first runs come one per step.
        self.heavy: frozenset[str] = frozenset(
            n for n in self.leaders
            if _HEAVY & by_name[n].requires or type(by_name[n]).default_every >= 100
        )
        #: Scheduled diagnostics whose calls stop at the budget's per-call time (:meth:`probe_seconds`) and
        #: continue at the next call; their first runs wait for a measured training step, and a run cut
        #: into calls continues at every step until it ends (:meth:`carry_on`). Followers too: ``sharpness``
        #: begins with ``hessian_trace`` but, when the trace's run is cut, cannot share its estimate and
        #: would otherwise run whole at that step.
        self.sliced: frozenset[str] = frozenset(n for n in names if by_name[n].resumable)
        #: Every-step diagnostics the budget thins when they alone take more than their share of it:
        #: those not scheduled whose schedule is every step and whose ``every`` was not given.
        self.thinned: frozenset[str] = frozenset(
            d.name for d in diagnostics
            if d.name not in self.scheduled and d.name not in explicit and d.every == 1
        )
        self.step_seconds: float | None = None
        self.fixed_seconds: float | None = None
        # The fixed part of a call that ran the thinned diagnostics, and of one that did not.
        self.fixed_with: float | None = None
        self.fixed_without: float | None = None
        self._thin_last: int | None = None  # the last step the thinned diagnostics ran
        self._thin_promised: int | None = None
        self._prev_thin = False
        self.cost: dict[str, float] = {}
        self.last: dict[str, int] = {}
        self.runs: dict[str, int] = {}
        self._promised: dict[str, int] = {}
        self._ledger = WindowLedger(self.budget, self.window)
        self._reserved: str | None = None  # the run the ledger turned away last, first in line
        # Of the current decision: runs outside the budget (first and second runs, a given every) and runs
        # the ledger admitted (a gap of the rule came due); with their followers.
        self._exempt_now: set[str] = set()
        self._admitted_now: set[str] = set()
        # Sliced runs: the seconds of the calls of each unfinished run so far, and the names whose run
        # goes on after the current call (the Monitor says so in :meth:`account`).
        self._partial: dict[str, float] = {}
        self._unfinished_now: frozenset[str] = frozenset()
        self._cut_order: dict[str, None] = {}  # the unfinished runs, in the order they were cut
        # Timing of the Monitor's calls; an entry is (step, steps since the previous call, training seconds
        # before the call, monitor seconds of the call and of its update phase).
        self._history: deque[tuple[int, int, float, float]] = deque(maxlen=self.window)
        self._in_call = False
        self._enter: float | None = None  # when the current (or last) call began
        self._step: int | None = None  # the step the current call decided, None before it decides
        # The last deciding call: (step, training seconds before it, steps since the call before it).
        self._prev: tuple[int, float, int] | None = None
        self._prev_exit: float | None = None
        self._prev_monitor = 0.0  # its monitor seconds, growing with its update phase between calls
        self._prev_between = 0.0  # of which between calls
        self._prev_scheduled = 0.0  # of which the scheduled diagnostics
        self._prev_pinned = 0.0  # of which the other diagnostics that keep their schedules
        self._pinned_seconds: float | None = None  # their average per call
        self._prev_exempt = 0.0  # of which runs outside the budget
        self._prev_admitted = 0.0  # of which runs the ledger admitted
        self._carry = 0.0  # hook seconds inside the training step, for the next deciding call

    # --- timing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Time one call of ``Monitor.step`` (wrap all of it). Cost: two clock reads."""
        self._in_call = True
        self._enter = self._clock()
        self._step = None
        try:
            yield
        finally:
            now = self._clock()
            self._in_call = False
            if self._step is None:  # the call decided nothing: its time joins the last call's
                self._prev_monitor += now - self._enter
                self._prev_between += now - self._enter
            else:
                self._prev_monitor += now - self._enter
                self._prev_exit = now

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """Time monitor work done between calls (the update phase, in the optimizer's hook)."""
        if self._in_call:
            yield
            return
        t0 = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - t0
            self._prev_monitor += spent
            self._prev_between += spent

    def charge(self, seconds: float) -> None:
        """Take monitor work done inside the training step since the last call (the diagnostics' hooks on
        the training forward): call before the call decides its step (:meth:`due`). It counts as the next
        deciding call's monitor time and not as training time, as the diagnostic it belongs to runs at that
        call."""
        self._carry += float(seconds)

    def observe_costs(self, seconds: Mapping[str, float]) -> None:
        """Take the seconds of the diagnostics that ran at the last decided step (both phases).

        Updates each scheduled diagnostic's cost average; the others count as fixed overhead.
        """
        for name, s in seconds.items():
            if not math.isfinite(s):
                continue
            if name not in self.scheduled:
                if name not in self.thinned:  # fixed by every= (or its own schedule): not what thinning saves
                    self._prev_pinned += s
                continue
            self._prev_scheduled += s
            if name in self._exempt_now:
                self._prev_exempt += s
            elif name in self._admitted_now:
                self._prev_admitted += s
            if name in self.sliced:
                s = self._partial.pop(name, 0.0) + float(s)
                if name in self._unfinished_now:
                    self._partial[name] = s
                    continue  # the run goes on: its cost is known when it ends
            if self.runs.get(name, 0) == 2:
                # The first run carries one-time work (a cold start instead of a warm one, an extra forward
                # before a forward was observed, first-call imports): the second replaces it.
                self.cost[name] = float(s)
            else:
                self.cost[name] = _average(self.cost.get(name), float(s), _COST_SMOOTHING)

    def _begin(self, step: int) -> None:
        """Close the last call's books (its monitor time, the fixed part of it, the training time since)."""
        now = self._enter if self._enter is not None else self._clock()
        delta, train = 1, 0.0
        if self._prev is not None and self._prev_exit is not None:
            prev_step, prev_train, prev_delta = self._prev
            self._history.append((prev_step, prev_delta, prev_train, self._prev_monitor))
            self._ledger.close(prev_delta, prev_train, self._prev_monitor, self._prev_exempt, self._prev_admitted)
            fixed = max(0.0, self._prev_monitor - self._prev_scheduled) / prev_delta
            self.fixed_seconds = _average(self.fixed_seconds, fixed, _STEP_SMOOTHING)
            # The two call costs are sampled once per stride rather than at every step, so weighted as a
            # diagnostic's cost is; from calls that ran no scheduled diagnostic (the isolation and commit such
            # a run brings are part of its cost), unless none ever did; and without the diagnostics pinned by
            # every=, which run whatever the stride.
            alone = self._prev_scheduled == 0.0
            self._pinned_seconds = _average(self._pinned_seconds, self._prev_pinned, _STEP_SMOOTHING)
            call = max(0.0, fixed * prev_delta - self._prev_pinned)
            if self._prev_thin and (alone or self.fixed_with is None):
                self.fixed_with = _average(self.fixed_with, call, _COST_SMOOTHING)
            elif not self._prev_thin and (alone or self.fixed_without is None):
                self.fixed_without = _average(self.fixed_without, call, _COST_SMOOTHING)
            delta = max(1, step - prev_step)
            # Monitor work between the calls (the update phase) is not training.
            train = max(0.0, now - self._prev_exit - self._prev_between - self._carry)
            self.step_seconds = _average(self.step_seconds, train / delta, _STEP_SMOOTHING)
        self._prev = (step, train, delta)
        self._prev_exit = None
        self._prev_monitor = self._prev_between = self._prev_scheduled = self._prev_pinned = 0.0
        self._prev_exempt = self._prev_admitted = 0.0
        self._prev_monitor, self._carry = self._carry, 0.0
        self._step = step

    def overhead(self) -> float | None:
        """Monitor time / training time over the last ``window`` steps, this call so far included; None
        before any training time was measured. Cost: one pass over at most ``window`` entries."""
        monitor = train = 0.0
        steps = 0
        if self._in_call and self._enter is not None:
            monitor += self._clock() - self._enter
        if self._step is not None:
            monitor += self._prev_monitor  # this call's update phase, when committing from the hook
        if self._prev is not None:
            train += self._prev[1]
            steps += self._prev[2]
        for _, delta, t, m in reversed(self._history):
            if steps >= self.window:
                break
            monitor, train, steps = monitor + m, train + t, steps + delta
        return monitor / train if train > 0 else None

    def account(self, statuses: Mapping[str, Any], unfinished: Iterable[str] = ()) -> list[Record]:
        """Take the costs of a step's diagnostics (``{name: Status}``; ``unfinished``: those whose run
        continues at a later call) and return the step's ``monitor_overhead`` record (none before any
        training time was measured)."""
        self._unfinished_now = frozenset(unfinished)
        self.note_unfinished([n for n in unfinished if n in self.sliced])
        self.observe_costs({n: s.seconds for n, s in statuses.items()})
        ratio = self.overhead()
        out = [] if ratio is None else [Record("monitor_overhead", ratio)]
        if self.thinned:
            out.append(Record("monitor_stride", float(self.stride())))
        return out

    # --- decisions --------------------------------------------------------------------------------------
    def intervals(self) -> dict[str, float]:
        """The current gap ``I_d`` (steps) of each leading scheduled diagnostic; inf when the budget leaves it
        nothing or it has not been measured yet. Cost: O(number of scheduled diagnostics squared)."""
        return dict(self._gaps())

    def _gaps(self) -> dict[str, float]:  # not a copy: the decisions only read it
        if self.step_seconds is None:
            return {n: math.inf for n in self.leaders}
        # due() and due_next() ask several times per step with the same measurements.
        key = (self.step_seconds, self.fixed_seconds, tuple(self.cost.items()))
        if self._intervals_memo is not None and self._intervals_memo[0] == key:
            return self._intervals_memo[1]
        out = self._intervals()
        self._intervals_memo = (key, out)
        return out

    def _intervals(self) -> dict[str, float]:
        rate = max(0.0, self.budget * self.step_seconds - (self.fixed_seconds or 0.0))
        cost = {n: self._lead_cost(n) for n in self.leaders}
        share: dict[str, float] = {}
        open_ = list(self.leaders)
        left = rate
        while open_:
            each = left / len(open_)
            capped = [n for n in open_ if cost[n] is not None and cost[n] <= each]
            if not capped:
                break
            for n in capped:  # runs at every step on less than its share: the rest goes to the others
                share[n] = cost[n]
                left -= cost[n]
                open_.remove(n)
        for n in open_:
            share[n] = left / len(open_)
        out: dict[str, float] = {}
        for n in self.leaders:
            c = cost[n]
            if c is None or share[n] <= 0:
                out[n] = math.inf
                continue
            r = c / share[n]
            if r <= 1:
                out[n] = 1.0
                continue
            span = max(self.window, 2 * r)
            out[n] = float(math.ceil(r * (span - 1) / (span - r)))
        return out

    def stride(self) -> int:
        """Steps between runs of the :attr:`thinned` diagnostics: 1 while their calls' fixed part fits in
        :data:`EVERY_STEP_SHARE` of the budget, else the smallest ``s`` for which one call with them and
        ``s - 1`` without fit it, at most :data:`MAX_STRIDE`. Cost: a few float operations."""
        if not self.thinned or self.step_seconds is None or self.fixed_with is None:
            return 1
        room = EVERY_STEP_SHARE * self.budget * self.step_seconds
        if self.fixed_with <= room:
            return 1
        without = self.fixed_without or 0.0
        if room <= without:
            return MAX_STRIDE
        return max(1, min(MAX_STRIDE, math.ceil((self.fixed_with - without) / (room - without))))

    def _thin_due(self, step: int) -> bool:
        if self._thin_promised == step:
            return True
        last = self._thin_last
        return last is None or step < last or step - last >= self.stride()

    def _lead_cost(self, name: str) -> float | None:
        c = self.cost.get(name)
        if c is None:
            return None
        return c + sum(self.cost.get(f, 0.0) for f in self._followers_of.get(name, ()))

    def _decide(self, step: int, thin: bool = False) -> list[str]:
        gaps = self._gaps()
        every_step: list[str] = []
        waiting: list[tuple[int, float, int, str]] = []  # (class, -overdue, position, name), smallest first
        first: set[str] = set()  # first runs among every_step
        for i, n in enumerate(self.leaders):
            if self._promised.get(n) == step:
                every_step.append(n)
                continue
            last = self.last.get(n)
            if last is None or step < last:  # not run yet (or the steps count again from below)
                # Before a first measurement only the kind of work tells a long probe from a short one.
                if n in self.heavy:
                    if n in self.sliced and self.probe_seconds() is None:
                        continue  # its calls are cut to a share of the step time, not measured yet
                    waiting.append((0, 0.0, i, n))
                else:
                    every_step.append(n)
                    first.add(n)
                continue
            gap = step - last
            if gap == 0:
                continue
            if gaps[n] == 1.0:
                every_step.append(n)
            elif self.runs.get(n, 0) < 2 and gap >= self.second_after:
                waiting.append((1, -gap, i, n))
            elif n in self.max_gap and gap >= self.max_gap[n]:
                waiting.append((1, -gap, i, n))
            elif gap >= gaps[n]:
                waiting.append((2, -gap / gaps[n], i, n))
        pick = min(waiting) if waiting else None
        if pick is not None and pick[0] == 2:
            # A run the ledger turned away keeps its turn: the others wait until it fits, or it would starve
            # behind cheaper ones that always fit.
            pick = next((w for w in waiting if w[0] == 2 and w[3] == self._reserved), pick)
            if self._admit(pick[3], [n for n in every_step if n not in first], thin):
                self._reserved = None
            else:
                self._reserved, pick = pick[3], None
        self._exempt_now = first | ({pick[3]} if pick is not None and pick[0] < 2 else set())
        self._admitted_now = {pick[3]} if pick is not None and pick[0] == 2 else set()
        chosen = every_step + ([pick[3]] if pick is not None else [])
        return [n for n in self.leaders if n in chosen]

    def _admit(self, name: str, every_step: list[str], thin: bool = False) -> bool:
        """Whether ``name``, due by its gap, fits now: every window of at least ``window`` steps ending at this
        call stays within the budget (:class:`WindowLedger`), with the fixed part and the scheduled runs of
        every step counted first. A run costlier than any window can pay for runs once no other admitted run
        is in the window (its gap keeps its average within the budget over ``2 r`` steps)."""
        cost = self._lead_cost(name)
        if cost is None or self.step_seconds is None or self._prev is None:
            return True
        fixed = self.fixed_seconds or 0.0
        steady = sum(self._lead_cost(n) or 0.0 for n in every_step)
        _, train, delta = self._prev
        # This call's own fixed part: with or without the thinned diagnostics, once both were measured.
        this_call = self.fixed_with if thin else self.fixed_without
        thinning = this_call is not None and self.stride() > 1
        pinned = self._pinned_seconds or 0.0
        now = this_call + pinned if thinning else fixed * delta
        # A window ending at a later call with them sits above the average of the thinned pattern by up to
        # the difference: kept free, or that window would go over by it.
        peak = max(0.0, (self.fixed_with or 0.0) + pinned - fixed) if thinning else 0.0
        if cost + peak <= self._ledger.room(train, now + steady):
            return True
        most = (self.budget * self.step_seconds - fixed - steady) * self.window
        return cost > most and self._ledger.quiet()

    def due(self, step: int, diagnostics: Sequence[Diagnostic]) -> list[Diagnostic]:
        """The diagnostics to run at ``step``: the scheduled ones the rule picks (rank 0's pick under
        torch.distributed), their followers, and the others on their own schedules.

        Call once per ``Monitor.step``, inside :meth:`call`. Cost: :meth:`intervals` plus, under
        torch.distributed, one broadcast.
        """
        self._begin(step)
        thin = self._thin_due(step)
        names = self._decide(step, thin)
        if self._sync is not None:
            # The stride comes from this rank's clock: rank 0's decision holds for the thinned ones too.
            names = list(self._sync(names + [_THINNED_TOKEN] if thin else names))
            thin = _THINNED_TOKEN in names
            names = [n for n in names if n != _THINNED_TOKEN]
        self._promised = {}
        chosen = set(names) | {f for n in names for f in self._followers_of.get(n, ())}
        for kind in (self._exempt_now, self._admitted_now):
            kind.update([f for n in kind for f in self._followers_of.get(n, ())])
        for n in chosen:
            self.last[n] = step
            self.runs[n] = self.runs.get(n, 0) + 1
        self._thin_promised = None
        sched, thinned = self.scheduled, self.thinned
        out = [d for d in diagnostics if (d.name in chosen if d.name in sched else d.is_due(step) and (
            thin or d.name not in thinned))]
        self._prev_thin = thin and any(d.name in thinned for d in out)
        if self._prev_thin:
            self._thin_last = step
        return out

    def due_next(self, d: Diagnostic, step: int) -> bool:
        """Whether ``d`` will be due at ``step + 1``; True binds the next decision (hooks may be installed
        for that step on the strength of it). Scheduled diagnostics are promised only when they run at every
        step and are ``cheap_to_observe``, and never under torch.distributed, where rank 0 decides: hooks
        held on a rank that rank 0 then overrules would leave a measurement to a later step. Cost:
        :meth:`intervals`."""
        if d.name not in self.scheduled:
            if not (d.every == 1 and d.is_due(step + 1)):
                return False
            if d.name not in self.thinned:
                return True
            if self._sync is not None or not self._thin_due(step + 1):
                return False
            self._thin_promised = step + 1
            return True
        if self._sync is not None or d.name in self.followers or d.name not in self.last:
            return False
        if not d.cheap_to_observe:  # its hooks' cost would pass for training time
            return False
        if self._gaps()[d.name] != 1.0:
            return False
        self._promised[d.name] = step + 1
        return True

    def may_run_next(self, d: Diagnostic, step: int) -> bool:
        """Whether ``d`` may be due at ``step + 1`` (binds nothing): its gap, or a rule that overrides the
        gap, will have come due; the window check may still turn it away. Cost: :meth:`intervals`."""
        if d.name not in self.scheduled:
            return d.is_due(step + 1) and (d.name not in self.thinned or self._thin_due(step + 1))
        n = self.followers.get(d.name, d.name)
        last = self.last.get(n)
        if last is None or step + 1 <= last:
            return False
        gap = step + 1 - last
        return (gap >= self._gaps()[n] or (self.runs.get(n, 0) < 2 and gap >= self.second_after)
                or gap >= self.max_gap.get(n, math.inf))

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the schedule (JSON-serialisable). Cost: small dict copies."""
        return {
            "budget": self.budget,
            "step_seconds": self.step_seconds,
            "fixed_seconds": self.fixed_seconds,
            "fixed_with": self.fixed_with,
            "fixed_without": self.fixed_without,
            "cost": dict(self.cost),
            "last": dict(self.last),
            "runs": dict(self.runs),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from :meth:`state_dict` (entries of diagnostics no longer scheduled are dropped)."""
        if not state:
            return
        for key in ("step_seconds", "fixed_seconds", "fixed_with", "fixed_without"):
            value = state.get(key)
            setattr(self, key, None if value is None else float(value))
        self.cost = {n: float(v) for n, v in (state.get("cost") or {}).items() if n in self.scheduled}
        self.last = {n: int(v) for n, v in (state.get("last") or {}).items() if n in self.scheduled}
        self.runs = {n: int(v) for n, v in (state.get("runs") or {}).items() if n in self.scheduled}


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


def timed_call(scheduler: BudgetScheduler | None) -> contextlib.AbstractContextManager[None]:
    """:meth:`BudgetScheduler.call`, or nothing without a budget."""
    return scheduler.call() if scheduler is not None else contextlib.nullcontext()


def timed_work(scheduler: BudgetScheduler | None) -> contextlib.AbstractContextManager[None]:
    """:meth:`BudgetScheduler.work`, or nothing without a budget."""
    return scheduler.work() if scheduler is not None else contextlib.nullcontext()
