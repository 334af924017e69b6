"""A run at a glance: what ``tdiag ls`` prints, as JSON-ready data. Imports no torch.

The per-metric figures are SQL aggregates over the series table, so summarising a run costs one pass
over its index rather than loading every row into pandas.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from diagnostics.store import catalog
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
FROM (SELECT step FROM series UNION SELECT step FROM events UNION SELECT step FROM status)
"""


def _value(v: Any) -> float:
    return math.nan if v is None else float(v)  # NULL is how the store keeps NaN


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
        num_steps, first_step, last_step = run._query(_STEPS)[0]
        num_sources = run._query("SELECT COUNT(*) FROM sources")[0][0]
        not_ok = run._query("SELECT status, COUNT(*) FROM status WHERE status != 'ok' GROUP BY status ORDER BY status")
        events = run.events()

    last_by_metric: dict[str, list[tuple[str, float]]] = {}
    for metric, key, value in last_rows:
        last_by_metric.setdefault(metric, []).append((key, _value(value)))
    metrics = []
    for metric, keys, steps, first, last, _ in per_metric:
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
