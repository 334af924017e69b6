"""The budget's ledger against a brute-force check of every window that ends at the current call."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.tracking.budget_window import WindowLedger

call = st.tuples(st.integers(1, 3), st.floats(0.5, 2.0), st.floats(0.0, 0.3))


def brute_room(history: list[tuple[int, float]], window: int, budget: float, train: float, planned: float) -> float:
    """-(largest excess over the calls of any window of >= window steps ending now) + what is left now."""
    total = sum(s for s, _ in history)
    need = min(window - 1, total)  # a history shorter than a window counts as a whole
    worst = -math.inf
    steps = excess = 0.0
    for s, x in reversed(history):
        steps += s
        excess += x
        if steps >= need:
            worst = max(worst, excess)
    if not history:
        worst = 0.0
    return budget * train - planned - worst


@settings(max_examples=60, deadline=None)
@given(calls=st.lists(call, min_size=0, max_size=60), window=st.integers(2, 12), budget=st.floats(0.05, 0.5),
       train=st.floats(0.5, 2.0), planned=st.floats(0.0, 0.2))
def test_room_matches_every_window_checked_by_brute_force(calls, window, budget, train, planned) -> None:
    ledger = WindowLedger(budget, window)
    history = []
    for steps, t, m in calls:
        ledger.close(steps, t, m)
        history.append((steps, m - budget * t))
    assert math.isclose(ledger.room(train, planned), brute_room(history, window, budget, train, planned),
                        rel_tol=1e-9, abs_tol=1e-9)


def test_exempt_runs_do_not_count_and_admitted_ones_make_the_window_busy() -> None:
    ledger = WindowLedger(0.1, 5)
    ledger.close(1, 1.0, monitor=50.0, exempt=50.0)  # a first run outside the budget: not held against later steps
    assert math.isclose(ledger.room(1.0, 0.0), 0.2)
    assert ledger.quiet()
    ledger.close(1, 1.0, monitor=0.3, admitted=0.3)
    assert not ledger.quiet()
    assert ledger.room(1.0, 0.0) < 0.2
    for _ in range(4):
        ledger.close(1, 1.0, monitor=0.0)
    # The admitted run (excess 0.2) left the last window - 1 steps but still weighs on longer windows.
    assert math.isclose(ledger.room(1.0, 0.0), 0.1 + 0.4 - 0.2)
    assert not ledger.quiet()
    ledger.close(1, 1.0, monitor=0.0)
    assert not ledger.quiet()  # paid back by half
    ledger.close(1, 1.0, monitor=0.0)
    assert ledger.quiet() and math.isclose(ledger.room(1.0, 0.0), 0.5)
