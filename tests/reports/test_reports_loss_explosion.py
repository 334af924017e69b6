"""Report findings date a loss explosion with the shared explosion rule when no event says so."""

from __future__ import annotations

import math

from diagnostics.reports.findings import run_findings
from diagnostics.reports.views import load_report_view
from diagnostics.store import Event, Record, RunWriter


def _findings(tmp_path, losses, steps=None, events=None):
    steps = list(range(len(losses))) if steps is None else steps
    events = events or {}
    with RunWriter(tmp_path / "run", name="run") as w:
        for step, loss in zip(steps, losses):
            w.write_step(step, [Record("loss", loss)], events=events.get(step, ()))
    (view,) = load_report_view(tmp_path / "run").runs
    return [f for f in run_findings(view) if f.kind in ("loss_explosion", "lead_time")]


def test_sustained_doubling_is_dated_to_its_start(tmp_path):
    found = _findings(tmp_path, [1.0] * 30 + [2.5] * 12)
    assert [(f.kind, f.step) for f in found] == [("loss_explosion", 30)]
    assert found[0].text == (
        "The loss exploded at step 30: it rose to 2.5, over 2x its lowest value so far (1), and stayed "
        "above that for 10 consecutive recorded steps (from the loss series)."
    )


def test_a_short_spike_or_a_tenfold_jump_at_the_end_is_not_an_explosion(tmp_path):
    # Nine high steps, then back to normal; then a twentyfold jump as the last record.
    assert _findings(tmp_path, [1.0] * 30 + [5.0] * 9 + [1.0] * 5 + [20.0]) == []


def test_streak_ending_in_nan_and_lead_time(tmp_path):
    warning = {25: [Event("explosion_warning", "drift", "warning", metric="sa_mean", key="l1")]}
    found = _findings(tmp_path, [1.0] * 30 + [3.0, 4.0, math.nan], events=warning)
    assert [(f.kind, f.step) for f in found] == [("loss_explosion", 30), ("lead_time", 25)]
    assert (
        "it rose to 3, over 2x its lowest value so far (1), and became non-finite at step 32" in found[0].text
    )
    assert "came 5 steps before the loss exploded (step 30)" in found[1].text


def test_recorded_steps_are_used(tmp_path):
    # Loss recorded every 10 steps: the streak starts at the 4th record, step 30, past the warm-up.
    found = _findings(tmp_path, [1.0] * 3 + [2.5] * 10, steps=[10 * i for i in range(13)])
    assert [(f.kind, f.step) for f in found] == [("loss_explosion", 30)]
    found = _findings(tmp_path / "nan", [1.0, math.nan], steps=[500, 510])
    assert [f.step for f in found] == [510] and "it became non-finite" in found[0].text


def test_event_takes_precedence(tmp_path):
    boom = {33: [Event("loss_explosion", "loss 9 (the monitor's rule)", "error", metric="loss", key="all")]}
    found = _findings(tmp_path, [1.0] * 30 + [2.5] * 12, events=boom)
    assert [(f.kind, f.step) for f in found] == [("loss_explosion", 33)]
    assert "the monitor's rule" in found[0].text and "from the loss series" not in found[0].text
