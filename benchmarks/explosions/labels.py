"""The benchmark's second label (loss spikes that recover) and how the divergence label moves with its rule.

- **Spike**: step t is a spike when its loss exceeds ``SPIKE_FACTOR`` (1.5) times the median of the 20
  losses before it; a spike *recovers* when the run does not explode (divergence label) within the next
  50 steps. Spikes closer than 20 steps to the previous one are the same event.
- **Sensitivity**: the divergence label recomputed from the stored losses with factor 1.5, 2, 3 and
  patience 5, 10, 20 (warm-up 20); per rule the number of exploding runs, and the per-step AUROC at
  H = 50 of a detector's full-length scores against that rule's labels. Runs were stopped 20 steps after
  the default rule's explosion, so a stricter rule can only find an explosion inside what was recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.explosions.signals import RunSignals

__all__ = ["spikes", "spike_table", "label_sensitivity"]

SPIKE_FACTOR = 1.5
SPIKE_CONTEXT = 20
RECOVERY = 50


def spikes(run: RunSignals) -> list[tuple[int, bool]]:
    """``[(step, recovered)]`` of the run's loss spikes (module docstring)."""
    loss = run.scalars["loss"]
    out: list[tuple[int, bool]] = []
    last = -(10**9)
    for t in range(SPIKE_CONTEXT, len(loss)):
        prev = loss[t - SPIKE_CONTEXT:t]
        prev = prev[np.isfinite(prev)]
        if not prev.size or not np.isfinite(loss[t]):
            continue
        if loss[t] > SPIKE_FACTOR * float(np.median(prev)) and t - last >= SPIKE_CONTEXT:
            recovered = run.explosion is None or run.explosion > t + RECOVERY
            out.append((t, recovered))
            last = t
    return out


def spike_table(runs: list[RunSignals]) -> dict[str, dict[str, int]]:
    """Per mechanism and member: runs, spikes that recovered, spikes followed by an explosion."""
    table: dict[str, dict[str, int]] = {}
    for r in runs:
        row = table.setdefault(f"{r.mechanism} / {r.member}", {"runs": 0, "recovered": 0, "before_explosion": 0})
        row["runs"] += 1
        for _, recovered in spikes(r):
            row["recovered" if recovered else "before_explosion"] += 1
    return dict(sorted(table.items()))


def label_sensitivity(
    runs: list[RunSignals], full_scores: Callable[[RunSignals], np.ndarray], auroc: Callable[..., float],
    start: int,
) -> list[dict[str, Any]]:
    """For each (factor, patience): exploding runs and the AUROC at H = 50 of ``full_scores`` (scores over
    every step of a run) against that rule's labels, over steps ``start`` .. its explosion."""
    rows = []
    for factor in (1.5, 2.0, 3.0):
        for patience in (5, 10, 20):
            ss, ys, n_exp = [], [], 0
            for r in runs:
                e = r.label(factor, patience)
                n_exp += e is not None
                end = e if e is not None else r.steps
                steps = np.arange(start, max(start, end))
                s = full_scores(r)[start:max(start, end)]
                ss.append(s)
                ys.append(np.zeros(len(steps), bool) if e is None else (e - steps) <= 50)
            rows.append({"factor": factor, "patience": patience, "exploding_runs": n_exp,
                         "auroc_50": auroc(np.concatenate(ss), np.concatenate(ys))})
    return rows
