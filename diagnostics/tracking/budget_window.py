"""The budget's ledger of recent calls: how much time a run may take now without any window going over.

Over any run of consecutive steps the monitor may spend ``budget`` times the training time. Write
``x_j = monitor_j - budget * train_j`` for call ``j`` (its monitor seconds less those of the runs promised
outside the budget, and the training seconds before it). Every window of at least ``window`` steps that
ends at the current call is within the budget exactly when the sum of ``x`` over the last ``window``
steps, plus the largest sum over a run of calls just before them (the Kadane recurrence
``K = max(0, K + x)`` over the calls that left the ledger), is at most zero. :class:`WindowLedger` keeps
the last ``window`` steps' calls and ``K``, and says how many seconds the current call may still take.
Checked at every call, this holds every such window, each being checked at its last call, up to the error
of the cost estimates the decisions use.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["WindowLedger"]


class WindowLedger:
    """The recent calls' excess over the budget (see the module docstring).

    Args:
        budget: monitor time / training time.
        window: the shortest window, in steps, the budget is held over.
    """

    def __init__(self, budget: float, window: int) -> None:
        self.budget = float(budget)
        self.window = int(window)
        # (steps, excess seconds, seconds of runs the ledger itself admitted)
        self._calls: deque[tuple[int, float, float]] = deque()
        self._steps = 0
        self._older = 0.0  # K: the largest sum of excess over calls ending where the ledger begins, or 0

    def close(self, steps: int, train: float, monitor: float, exempt: float = 0.0, admitted: float = 0.0) -> None:
        """Book one finished call: ``steps`` steps since the one before, ``train`` training seconds before
        it, ``monitor`` seconds of the monitor (update phase included), of which ``exempt`` were runs
        outside the budget and ``admitted`` runs this ledger let through. Cost: O(1) amortised."""
        self._calls.append((int(steps), (monitor - exempt) - self.budget * train, admitted))
        self._steps += int(steps)
        # Keep the calls of the last window - 1 steps: with the current call's own step they make a window.
        while self._calls and self._steps - self._calls[0][0] >= self.window - 1:
            s, excess, _ = self._calls.popleft()
            self._steps -= s
            self._older = max(0.0, self._older + excess)

    def room(self, train: float, planned: float) -> float:
        """Seconds the current call may add to ``planned`` (what it will spend anyway) with every window of
        at least ``window`` steps ending here within the budget; ``train`` is the training time before it.
        Negative when ``planned`` alone goes over. Cost: one pass over the ledger (at most ``window`` calls)."""
        recent = math.fsum(x for _, x, _ in self._calls)
        return self.budget * train - planned - recent - self._older

    def quiet(self) -> bool:
        """True when no run the ledger admitted is in its window and nothing older is over the budget."""
        return self._older <= 0.0 and all(a <= 0.0 for _, _, a in self._calls)
