"""A run at a glance: what ``tdiag ls`` prints, as JSON-ready data. Imports no torch.

The per-metric figures are SQL aggregates over the series and vectors tables, so summarising a run costs
one pass over their indexes rather than loading every row into pandas.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from diagnostics.store import catalog, vectors
from diagnostics.store.reader import open_run

__all__ = ["run_summary"]

_PER_METRIC = """
SELECT metric, COUNT(DISTINCT key), COUNT(DISTINCT step), MIN(step), MAX(step), MIN(idx)
FROM series GROUP BY metric ORDER BY metric
"""
# The rows of each metric at its last step and lowest index, 'all' and the first source first.
_LAST_ROWS = """
SELECT s.metric, s.key, s.value
FROM series AS s
JOIN (SELECT metric, MAX(step) AS step, MIN(idx) AS idx FROM series GROUP BY metric) AS last
  ON s.metric = last.metric AND s.step = last.step AND s.idx = last.idx
ORDER BY s.metric, s.key != 'all', s.key, s.source
"""
_STEPS = """
SELECT COUNT(*), MIN(step), MAX(step)
FROM (SELECT step FROM series UNION SELECT step FROM events UNION SELECT step FROM status{vectors})
"""
# Metrics with vector rows (per-layer values): their figures combine both tables, metric by metric.
_VECTOR_METRICS = "SELECT DISTINCT metric FROM vectors ORDER BY metric"
_BOTH_STEPS = """
SELECT COUNT(*), MIN(step), MAX(step)
FROM (SELECT step FROM series WHERE metric = ?1 UNION SELECT step FROM vectors WHERE metric = ?1)
"""


def _value(v: Any) -> float:
    return math.nan if v is None else float(v)  # NULL is how the store keeps NaN


def _combined_figures(run: Any, metric: str) -> tuple[int, int, int, int, list[tuple[str, float]]]:
    """``(keys, steps, first step, last step, [(key, value)] at the last step and lowest index)`` of a
    metric with vector rows, over its long rows and its vector rows together."""
    keys = {r[0] for r in run._query("SELECT DISTINCT key FROM series WHERE metric = ?", (metric,))}
    cache: dict[str, list[str]] = {}
    for (text,) in run._query("SELECT DISTINCT keys FROM vectors WHERE metric = ?", (metric,)):
        keys.update(vectors.keys_of(text, cache))
    steps, first, last = run._query(_BOTH_STEPS, (metric,))[0]
    idx = run._query("SELECT min(i) FROM (SELECT min(idx) AS i FROM series WHERE metric = ?1 AND step = ?2 "
                     "UNION ALL SELECT min(idx) FROM vectors WHERE metric = ?1 AND step = ?2)", (metric, last))[0][0]
    rows = [(k, _value(v)) for k, v in run._query(
        "SELECT key, value FROM series WHERE metric = ? AND step = ? AND idx = ? ORDER BY key != 'all', key, source",
        (metric, last, idx))]
    for text, data in run._query("SELECT keys, data FROM vectors WHERE metric = ? AND step = ? AND idx = ? "
                                 "ORDER BY source", (metric, last, idx)):
        rows += zip(vectors.keys_of(text, cache), vectors.unpack(data).tolist())
    return len(keys), int(steps), int(first), int(last), rows


def run_summary(path: str | os.PathLike[str], *, max_events: int = 20) -> dict[str, Any]:
    """Summarise a run: the run, each metric's steps and last value, its events and failed estimates.

    A metric's ``last_value`` is its ``key="all"`` value at its last step (at its lowest index, for
    vectors); a metric recorded only per layer has ``last_value`` None unless it has a single key, and
    ``last_min``/``last_max`` give the spread over its keys at that step. ``kind`` is the metric's kind
    in :mod:`diagnostics.store.catalog` (None for an ID the catalogue does not know).

    Args:
        path: run directory or ``.sqlite`` file.
        max_events: events to list (the first by step); ``num_events`` counts them all.

    Returns:
        ``{run, path, created, model, num_params, steps, first_step, last_step, checkpoints_analysed,
        metrics: [{metric, kind, keys, steps, first_step, last_step, last_value, last_min, last_max}],
        events: [{step, kind, severity, key, message}], num_events, not_ok: {status: count}}``.

    Raises:
        StoreError: ``path`` is not a run store.
    """
    with open_run(path) as run:
        meta = run.meta
        per_metric = run._query(_PER_METRIC)
        last_rows = run._query(_LAST_ROWS)
        with_vectors = [r[0] for r in run._query(_VECTOR_METRICS)] if run._has_vectors else []
        combined = {m: _combined_figures(run, m) for m in with_vectors}
        num_steps, first_step, last_step = run._query(
            _STEPS.format(vectors=" UNION SELECT step FROM vectors" if run._has_vectors else ""))[0]
        num_sources = run._query("SELECT COUNT(*) FROM sources")[0][0]
        not_ok = run._query("SELECT status, COUNT(*) FROM status WHERE status != 'ok' GROUP BY status ORDER BY status")
        events = run.events()

    last_by_metric: dict[str, list[tuple[str, float]]] = {}
    for metric, key, value in last_rows:
        last_by_metric.setdefault(metric, []).append((key, _value(value)))
    figures = {metric: (keys, steps, first, last) for metric, keys, steps, first, last, _ in per_metric}
    for metric, (keys, steps, first, last, rows) in combined.items():
        figures[metric] = (keys, steps, first, last)
        last_by_metric[metric] = rows
    metrics = []
    for metric in sorted(figures):
        keys, steps, first, last = figures[metric]
        rows = last_by_metric.get(metric, [])
        at_all = [v for k, v in rows if k == "all"]
        last_value = at_all[0] if at_all else rows[0][1] if len(rows) == 1 else None
        values = [v for _, v in rows if not math.isnan(v)]
        spec = catalog.METRICS.get(metric)
        metrics.append({
            "metric": metric,
            "kind": spec.kind if spec else None,
            "keys": int(keys),
            "steps": int(steps),
            "first_step": int(first),
            "last_step": int(last),
            "last_value": last_value,
            "last_min": min(values) if values else math.nan,
            "last_max": max(values) if values else math.nan,
        })
    summary_model = meta.get("model_summary") or {}
    return {
        "run": meta.get("run_name"),
        "path": str(Path(path)),
        "created": meta.get("created"),
        "model": summary_model.get("class"),
        "num_params": summary_model.get("num_params"),
        "steps": int(num_steps),
        "first_step": first_step,
        "last_step": last_step,
        "checkpoints_analysed": int(num_sources),
        "metrics": metrics,
        "events": [
            {"step": int(e.step), "kind": e.kind, "severity": e.severity, "key": e.key, "message": e.message}
            for e in events.head(max_events).itertuples()
        ],
        "num_events": int(len(events)),
        "not_ok": {str(status): int(n) for status, n in not_ok},
    }
