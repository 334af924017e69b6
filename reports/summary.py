"""What a reader wants first about each run, and the reference levels the charts draw.

* :func:`run_outcome`: stable, spike or explosion, by the project's one explosion rule
  (:mod:`diagnostics.explosion`): a *spike* is a loss above ``FACTOR`` x its running minimum (after the
  warm-up) that came back down before ``PATIENCE`` recorded steps, an *explosion* one that did not.
* :func:`sgd_threshold_label`, :func:`adam_threshold_label`: the formula behind a stored stability
  threshold. The sharpness diagnostic stores the threshold it used (2/lr, 2(1+beta)/lr with heavy-ball
  momentum beta, 2(1+beta)/((1+2 beta) lr) with Nesterov momentum, (2+2 beta1)/((1-beta1) lr) for Adam), not
  the formula; the report reads the formula back from threshold x learning rate so that the chart's label
  names the line actually drawn.
* :func:`explosion_score_level`: the explosion score below which the detector cannot warn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diagnostics.explosion import FACTOR, PATIENCE, WARMUP, explosion_step
from diagnostics.store.catalog import ADAM_SETTLING_REASON

from .views import RunView


@dataclass
class Outcome:
    """``kind``: "explosion", "spike", "stable" or "unknown" (no loss recorded)."""

    kind: str
    step: int | None
    text: str


def _by_step(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps, first = np.unique(np.asarray(steps), return_index=True)
    return steps, np.asarray(values, dtype=np.float64)[first]


def explosion_of(run: RunView) -> int | None:
    """The explosion step: the first ``loss_explosion`` event, else the rule on the loss series."""
    events = run.events_of("loss_explosion")
    if events:
        return events[0].step
    c = run.curve("loss")
    if c is None:
        return None
    steps, values = _by_step(*c)
    return explosion_step(values, [int(s) for s in steps])


def spikes(steps: np.ndarray, values: np.ndarray) -> list[tuple[int, int, float]]:
    """Finite streaks above ``FACTOR`` x the running minimum (steps >= ``WARMUP``) that ended:
    ``(first step, recorded steps, peak / running minimum)``. The rule's "high" entries, without the
    patience that makes them an explosion."""
    steps, values = _by_step(steps, values)
    out: list[tuple[int, int, float]] = []
    run_min = math.inf
    start: int | None = None
    peak = 0.0
    for i, (s, v) in enumerate(zip(steps.tolist(), values.tolist())):
        if math.isfinite(v):
            run_min = min(run_min, v)
        high = math.isfinite(v) and s >= WARMUP and run_min > 0 and v > FACTOR * run_min
        if high:
            if start is None:
                start, peak = i, 0.0
            peak = max(peak, v / run_min)
        elif start is not None:
            out.append((int(steps[start]), i - start, peak))
            start = None
    return out


def run_outcome(run: RunView) -> Outcome:
    """Stable, spike or explosion at step s (see the module docstring)."""
    c = run.curve("loss")
    boom = explosion_of(run)
    if boom is not None:
        return Outcome("explosion", boom, f"explosion at step {boom}")
    if c is None:
        return Outcome("unknown", None, "no loss recorded")
    found = [s for s in spikes(*c) if s[1] < PATIENCE]
    if found:
        first = found[0]
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        return Outcome("spike", first[0], f"spike at step {first[0]}{more}, recovered")
    return Outcome("stable", None, "stable")


def final_loss(run: RunView) -> tuple[int, float] | None:
    """The last finite loss and its step."""
    c = run.curve("loss")
    if c is None:
        return None
    s, v = c
    ok = np.flatnonzero(np.isfinite(v))
    if not len(ok):
        return None
    return int(s[ok[-1]]), float(v[ok[-1]])


# --- stability thresholds ---------------------------------------------------------------------------


def _ratio_at_common_steps(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float | None:
    """Median of a x b over the steps both series recorded (finite, positive values)."""
    sa, va = _by_step(*a)
    sb, vb = _by_step(*b)
    common, ia, ib = np.intersect1d(sa, sb, return_indices=True)
    if not len(common):
        return None
    prod = va[ia] * vb[ib]
    prod = prod[np.isfinite(prod) & (prod > 0)]
    return float(np.median(prod)) if len(prod) else None


def _threshold_times_lr(run: RunView, metric: str) -> float | None:
    thr = run.curve(metric)
    if thr is None:
        return None
    lr = run.curve("learning_rate")
    if lr is not None:
        got = _ratio_at_common_steps(thr, lr)
        if got is not None:
            return got
    settings = (run.meta.get("diagnostics") or {}).get("sharpness")
    fixed = settings.get("lr") if isinstance(settings, dict) else None
    if isinstance(fixed, (int, float)) and fixed > 0:
        v = thr[1][np.isfinite(thr[1]) & (thr[1] > 0)]
        return float(np.median(v)) * float(fixed) if len(v) else None
    return None


def _num(x: float) -> str:
    return f"{x:.3g}"


def sgd_threshold_label(run: RunView) -> str:
    """The formula of the run's ``stability_threshold``: 2/lr, 2(1+β)/lr or Nesterov's form."""
    t = _threshold_times_lr(run, "stability_threshold")
    if t is None:
        return "stability threshold (as stored)"
    k = t / 2.0
    if abs(k - 1.0) < 1e-3:
        return "2/lr"
    if k > 1.0:
        return f"2(1+β)/lr, β = {_num(k - 1.0)}"
    if 0.5 < k < 1.0:
        return f"2(1+β)/((1+2β)·lr), Nesterov β = {_num((1.0 - k) / (2.0 * k - 1.0))}"
    return "stability threshold (as stored)"


def adam_threshold_label(run: RunView) -> str:
    """The formula of the run's ``adam_threshold``: (2+2β₁)/((1−β₁)lr) with its β₁."""
    t = _threshold_times_lr(run, "adam_threshold")
    if t is None or t <= 2.0:
        return "(2+2β₁)/((1−β₁)·lr)"
    beta1 = (t - 2.0) / (t + 2.0)
    return f"(2+2β₁)/((1−β₁)·lr), β₁ = {_num(beta1)} ({_num(t)}/lr)"


# --- the explosion detector's warning level -----------------------------------------------------------


def crossings_announced(run: RunView) -> bool:
    """Whether the run's ``sharpness`` diagnostic stored its own threshold crossings as ``edge_of_stability``
    events. It leaves out Adam's first steps, whose preconditioner is still settling (a ratio far above 1
    there is no edge of stability), so for such a run no event means no crossing, whatever those first
    ratios were; only stores without it are read from the ratio series."""
    return "sharpness" in (run.meta.get("diagnostics") or {})


def adam_settling_until(run: RunView) -> int | None:
    """The last step at which a ``sharpness`` probe ended while Adam's preconditioner was still settling
    (its status reason says so), or None. Settling only happens at the start of training (the newest
    squared gradient's weight in v_hat falls with Adam's step), so every Adam ratio measured at or before
    that step is one to which Adam's threshold does not apply."""
    st = run.status
    if st is None or st.empty or "reason" not in st:
        return None
    rows = st[(st["diagnostic"] == "sharpness")
              & st["reason"].astype(str).str.contains(ADAM_SETTLING_REASON, regex=False)]
    return int(rows["step"].max()) if len(rows) else None


def _detector_settings(run: RunView) -> dict[str, Any]:
    s = (run.meta.get("diagnostics") or {}).get("explosion_detector")
    return s if isinstance(s, dict) else {}


def _eligible_from_state(run: RunView) -> int | None:
    state = (run.meta.get("diagnostic_state") or {}).get("explosion_detector")
    layers = state.get("detector", {}).get("layers") if isinstance(state, dict) else None
    if not isinstance(layers, dict) or not layers:
        return None
    return sum(1 for ls in layers.values() if isinstance(ls, dict) and ls.get("eligible"))


def _eligible_from_series(run: RunView, settings: dict[str, Any]) -> int | None:
    """Layers whose baseline (median of the probes after ``skip``, ``warmup`` of them) reaches
    ``min_baseline``: the detector's eligibility, re-derived where its state was not saved."""
    statistic = str(settings.get("statistic", "sa_sign_diversity"))
    md = run.metric(statistic)
    if md is None:
        return None
    skip, warmup = int(settings.get("skip", 40)), int(settings.get("warmup", 60))
    min_base = float(settings.get("min_baseline", 0.3))
    n = 0
    for key in md.layer_keys():
        _, v = md.curve(key) or (None, np.zeros(0))
        w = v[skip:skip + warmup]
        w = w[np.isfinite(w)]
        if len(w) < warmup:
            continue
        if statistic != "sa_sign_diversity" or float(np.median(w)) >= min_base:
            n += 1
    return n or None


def explosion_score_level(run: RunView) -> tuple[float, str] | None:
    """``(level, label)``: the score below which the detector cannot warn. For the signal detector
    (``method`` "signals") its threshold; for the spectral-alignment detector the score with
    ``min_layers`` of the eligible layers fully past their deviation thresholds (a warning needs that many
    layers in alarm, each contributing 1 to the mean). None when the run did not record the score."""
    if not run.has("explosion_score"):
        return None
    settings = _detector_settings(run)
    if settings.get("method") == "signals":
        threshold = settings.get("threshold")
        if not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            return None
        return float(threshold), f"warning threshold {float(threshold):.3g}"
    min_layers = int(settings.get("min_layers", 2))
    eligible = _eligible_from_state(run)
    how = ""
    if eligible is None:
        eligible = _eligible_from_series(run, settings)
        how = ", estimated"
    if not eligible:
        return None
    level = min(1.0, min_layers / eligible)
    return level, f"warning level {min_layers}/{eligible} layers{how}"


# --- cost --------------------------------------------------------------------------------------------


def monitoring_cost(run: RunView) -> tuple[float, float, str | None] | None:
    """``(total seconds, seconds per recorded step, costliest diagnostic)`` from ``monitor_seconds``,
    else from the status table; None when neither was recorded."""
    md = run.metric("monitor_seconds")
    totals: dict[str, float] = {}
    if md is not None:
        for key in md.keys():
            c = md.curve(key)
            if c is not None:
                v = c[1][np.isfinite(c[1])]
                totals[key] = float(v.sum())
    elif run.status_summary:
        totals = {s.diagnostic: s.seconds for s in run.status_summary}
    if not totals:
        return None
    total = sum(totals.values())
    steps = max(len(run.steps), 1)
    top = max(totals, key=lambda k: totals[k]) if total > 0 else None
    return total, total / steps, top
