"""View models: what the report shows, read once from the store into plain dataclasses.

The store hands back long-format pandas frames ``(run, step, metric, key, index, value)``; panels want
per-key numpy arrays. :func:`load_report_view` does that conversion once per metric, so every panel works
on sorted arrays and no panel touches the store. Cost: one ``series(metric=...)`` query per metric plus a
sort of its rows.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diagnostics.errors import ConfigError, StoreError

# Event kinds the report knows how to phrase; other kinds are listed verbatim.
EVENT_KINDS = (
    "explosion_warning",
    "loss_explosion",
    "edge_of_stability",
    "nonfinite",
    "estimator_failed",
    "rank_collapse",
)


@dataclass
class KeySeries:
    """All values of one metric for one key, sorted by ``(index, step)``.

    ``steps``, ``index`` and ``values`` have the same length; most metrics only use index 0.
    """

    steps: np.ndarray
    index: np.ndarray
    values: np.ndarray

    def curve(self, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(steps, values)`` of one index, sorted by step (a view, no copy)."""
        lo, hi = np.searchsorted(self.index, [index, index + 1])
        return self.steps[lo:hi], self.values[lo:hi]

    def indices(self) -> np.ndarray:
        """Return the distinct indices present, ascending."""
        return np.unique(self.index)

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(steps, indices, matrix)`` with ``matrix[s, i]`` the value (NaN where absent).

        Meant for vector metrics (eigenvalues, density nodes, histograms): small index ranges.
        """
        steps, s_pos = np.unique(self.steps, return_inverse=True)
        idx, i_pos = np.unique(self.index, return_inverse=True)
        out = np.full((len(steps), len(idx)), np.nan)
        out[s_pos, i_pos] = self.values
        return steps, idx, out


@dataclass
class MetricData:
    """One metric of one run: ``by_key`` maps a key (``"all"`` or a layer name) to its series."""

    name: str
    by_key: dict[str, KeySeries]

    def keys(self) -> list[str]:
        """Return the keys present, ``"all"`` first then the layers in model order."""
        return list(self.by_key)

    def layer_keys(self) -> list[str]:
        """Return the keys other than ``"all"``."""
        return [k for k in self.by_key if k != "all"]

    def curve(self, key: str = "all", index: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """Return ``(steps, values)`` for one key and index, or None when that key is absent."""
        series = self.by_key.get(key)
        if series is None:
            return None
        steps, values = series.curve(index)
        return (steps, values) if len(steps) else None

    def first_curve(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """Return ``(key, steps, values)`` of ``"all"`` if present, else of the first key."""
        for key in self.by_key:
            c = self.curve(key)
            if c is not None:
                return key, c[0], c[1]
        return None


@dataclass
class EventView:
    """One event (alert) as the report phrases it."""

    step: int
    kind: str
    severity: str
    message: str
    metric: str | None = None
    key: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class StatusSummary:
    """How one diagnostic fared over the run: counts by status, cost, and its first failure."""

    diagnostic: str
    calls: int
    ok: int
    not_converged: int
    failed: int
    seconds: float
    num_matvecs: int | None
    first_failure_step: int | None = None
    first_failure_reason: str | None = None
    #: When the diagnostic's last calls were of a probe cut into calls that never ended (status
    #: ``continues`` to the end of the records): the first of those calls' steps, and their products.
    unended_from: int | None = None
    unended_products: int | None = None


@dataclass
class RunView:
    """Everything the report shows about one run."""

    name: str
    path: str
    meta: dict[str, Any]
    metrics: dict[str, MetricData]
    events: list[EventView]
    status: pd.DataFrame
    status_summary: list[StatusSummary]
    steps: np.ndarray

    @property
    def empty(self) -> bool:
        """True when the run holds no series, events or statuses at all."""
        return not self.metrics and not self.events and self.status.empty

    def has(self, *metrics: str) -> bool:
        """True when any of ``metrics`` was recorded in this run."""
        return any(m in self.metrics for m in metrics)

    def metric(self, name: str) -> MetricData | None:
        """Return one metric's data, or None when it was not recorded."""
        return self.metrics.get(name)

    def curve(self, metric: str, key: str = "all") -> tuple[np.ndarray, np.ndarray] | None:
        """Return ``(steps, values)`` of one metric's key (index 0), or None when it was not recorded."""
        md = self.metrics.get(metric)
        return md.curve(key) if md is not None else None

    def events_of(self, *kinds: str) -> list[EventView]:
        """Return the events of the given kinds, in step order."""
        return [e for e in self.events if e.kind in kinds]

    def failed_steps(self, diagnostic_prefix: str = "") -> dict[int, str]:
        """Return ``{step: reason}`` of failed statuses whose diagnostic name starts with the prefix."""
        if self.status.empty:
            return {}
        df = self.status[self.status["status"] == "failed"]
        if diagnostic_prefix:
            df = df[df["diagnostic"].astype(str).str.startswith(diagnostic_prefix)]
        return {int(s): ("" if r is None or (isinstance(r, float) and math.isnan(r)) else str(r))
                for s, r in zip(df["step"], df["reason"])}


@dataclass
class ReportView:
    """The whole report's data: a title and one view per run (in the order given)."""

    title: str
    runs: list[RunView]

    def has(self, *metrics: str) -> bool:
        """True when any run recorded any of ``metrics``."""
        return any(r.has(*metrics) for r in self.runs)


def _natural_key(s: str) -> list[Any]:
    """Sort key that orders ``layer2`` before ``layer10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _model_order(meta: dict[str, Any]) -> dict[str, int]:
    """Return parameter name -> position in the model, from ``model_summary.parameters`` if recorded."""
    summary = meta.get("model_summary")
    params = summary.get("parameters") if isinstance(summary, dict) else None
    if isinstance(params, (dict, list)):
        return {str(name): i for i, name in enumerate(params)}
    return {}


def order_keys(keys: Iterable[str], meta: dict[str, Any]) -> list[str]:
    """Order keys as the layers appear in the model: ``"all"`` first, then by the first parameter
    whose name equals the key or starts with ``key + "."``; unknown keys last, naturally sorted."""
    order = _model_order(meta)
    names = list(order)

    def position(key: str) -> tuple[int, float, list[Any]]:
        if key == "all":
            return (0, 0.0, [])
        if key in order:
            return (1, float(order[key]), _natural_key(key))
        prefix = key + "."
        for name in names:
            if name.startswith(prefix):
                return (1, order[name] - 0.5, _natural_key(key))
        return (2, 0.0, _natural_key(key))

    return sorted(set(keys), key=position)


def _metric_data(name: str, df: pd.DataFrame, meta: dict[str, Any]) -> MetricData:
    """Split one metric's long frame into per-key arrays sorted by (index, step)."""
    steps = df["step"].to_numpy(dtype=np.int64)
    index = df["index"].to_numpy(dtype=np.int64)
    values = pd.to_numeric(df["value"], errors="coerce").to_numpy(dtype=np.float64)
    # factorize hashes the key strings (sorting a million strings with np.unique is much slower)
    codes, uniq = pd.factorize(df["key"].astype(str), sort=False)
    uniq = np.asarray(uniq)
    # One lexsort orders everything by key, then index, then step; each key is then a contiguous slice.
    order = np.lexsort((steps, index, codes))
    codes, steps, index, values = codes[order], steps[order], index[order], values[order]
    bounds = np.searchsorted(codes, np.arange(len(uniq) + 1))
    by_key_unordered = {
        str(k): KeySeries(steps[bounds[i]:bounds[i + 1]], index[bounds[i]:bounds[i + 1]],
                          values[bounds[i]:bounds[i + 1]])
        for i, k in enumerate(uniq)
    }
    by_key = {k: by_key_unordered[k] for k in order_keys(by_key_unordered, meta)}
    return MetricData(name, by_key)


def _events(df: pd.DataFrame) -> list[EventView]:
    out: list[EventView] = []
    if df is None or df.empty:
        return out
    for row in df.sort_values("step", kind="stable").itertuples(index=False):
        data = getattr(row, "data", None)
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                data = {"data": data}
        out.append(EventView(
            step=int(row.step),
            kind=str(row.kind),
            severity=str(getattr(row, "severity", "info") or "info"),
            message=str(getattr(row, "message", "") or ""),
            metric=_opt_str(getattr(row, "metric", None)),
            key=_opt_str(getattr(row, "key", None)),
            data=data if isinstance(data, dict) else {},
        ))
    return out


def _opt_str(x: Any) -> str | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return str(x)


def _status_summary(df: pd.DataFrame) -> list[StatusSummary]:
    if df is None or df.empty:
        return []
    out = []
    for diag, g in df.sort_values(["diagnostic", "step"], kind="stable").groupby("diagnostic", sort=True):
        st = g["status"].astype(str)
        failed = g[st == "failed"]
        mv = pd.to_numeric(g.get("num_matvecs"), errors="coerce") if "num_matvecs" in g else None
        seconds = pd.to_numeric(g.get("seconds"), errors="coerce") if "seconds" in g else None
        out.append(StatusSummary(
            diagnostic=str(diag),
            calls=len(g),
            ok=int((st == "ok").sum()),
            not_converged=int((st == "not_converged").sum()),
            failed=len(failed),
            seconds=float(np.nansum(seconds.to_numpy(dtype=float))) if seconds is not None else 0.0,
            num_matvecs=(int(np.nansum(mv.to_numpy(dtype=float)))
                         if mv is not None and mv.notna().any() else None),
            first_failure_step=int(failed["step"].iloc[0]) if len(failed) else None,
            first_failure_reason=(_opt_str(failed["reason"].iloc[0]) if len(failed) else None),
            **_unended(g, st, mv),
        ))
    return out


def _unended(g: pd.DataFrame, st: pd.Series, mv: pd.Series | None) -> dict[str, Any]:
    """``unended_from`` / ``unended_products`` of one diagnostic's calls (sorted by step): its trailing
    ``continues`` calls, or {} when its last call ended what it measured."""
    ended = (st != "continues").to_numpy()
    if not len(st) or ended[-1]:
        return {}
    tail = len(st) - (int(np.flatnonzero(ended)[-1]) + 1 if ended.any() else 0)
    products = None
    if mv is not None and mv.iloc[-tail:].notna().any():
        products = int(np.nansum(mv.iloc[-tail:].to_numpy(dtype=float)))
    return {"unended_from": int(g["step"].iloc[-tail]), "unended_products": products}


def _at_measured_steps(metrics: dict[str, MetricData]) -> None:
    """Place the records of a probe that spanned several calls at the step it measured, which its
    ``*_probe_step`` record names (``hessian_probe_step``, ``sharpness_probe_step``, ...), instead of
    the step it ended; in place. Cost: one pass over those metrics' records."""
    from diagnostics.store.catalog import METRICS, written_by

    for name, spec in METRICS.items():
        if not name.endswith("_probe_step") or name not in metrics:
            continue
        moves = {(key, int(st)): int(v) for key, ks in metrics[name].by_key.items()
                 for st, v in zip(ks.steps, ks.values, strict=True) if math.isfinite(v)}
        for other in written_by(spec.writer):
            md = metrics.get(other)
            if other == name or md is None:
                continue
            for key, ks in list(md.by_key.items()):
                steps = np.array([moves.get((key, int(st)), st) for st in ks.steps], dtype=ks.steps.dtype)
                if np.array_equal(steps, ks.steps):
                    continue
                order = np.lexsort((steps, ks.index))  # KeySeries are sorted by (index, step)
                md.by_key[key] = KeySeries(steps[order], ks.index[order], ks.values[order])


def _events_at_measured_steps(events: list[EventView]) -> list[EventView]:
    """Events of a probe that spanned several calls (their ``data["probe_step"]``) at the step it
    measured, like its records (:func:`_at_measured_steps`); sorted by step."""
    for e in events:
        measured = e.data.get("probe_step")
        if e.kind == "edge_of_stability" and isinstance(measured, (int, float)) and math.isfinite(measured):
            e.step = int(measured)
    return sorted(events, key=lambda e: e.step)


def _run_view(run: Any) -> RunView:
    """Read one store ``Run`` into a :class:`RunView`: one query per metric."""
    meta = dict(run.meta or {})
    metrics: dict[str, MetricData] = {}
    all_steps: list[np.ndarray] = []
    for name in sorted(run.metrics()):
        df = run.series(metric=name)
        if df is None or df.empty:
            continue
        metrics[str(name)] = _metric_data(str(name), df, meta)
    _at_measured_steps(metrics)
    for md in metrics.values():
        all_steps.extend(s.steps for s in md.by_key.values())
    status = run.status()
    if status is None:
        status = pd.DataFrame(columns=["run", "step", "diagnostic", "status", "reason", "seconds",
                                       "num_matvecs"])
    steps = np.unique(np.concatenate(all_steps)) if all_steps else np.zeros(0, dtype=np.int64)
    name = getattr(run, "name", None) or meta.get("run_name") or Path(str(run.path)).parent.name
    return RunView(
        name=str(name),
        path=str(getattr(run, "path", "")),
        meta=meta,
        metrics=metrics,
        events=_events_at_measured_steps(_events(run.events())),
        status=status,
        status_summary=_status_summary(status),
        steps=steps,
    )


def _as_runs(runs: Any) -> list[Any]:
    """Normalise ``runs`` (a path, a Run, a Runs, or a list of paths/Runs) to a list of Run objects."""
    from diagnostics.store import Run, Runs, open_runs

    if isinstance(runs, (str, os.PathLike, Run)):
        runs = [runs]
    if isinstance(runs, Runs):
        return list(runs)
    try:
        items = list(runs)
    except TypeError:
        raise ConfigError(f"build_report: expected run directories or Run objects, got {type(runs).__name__}") from None
    if not items:
        raise ConfigError("build_report: no runs given; pass at least one run directory")
    for r in items:
        if not isinstance(r, (str, os.PathLike, Run)):
            raise ConfigError(f"build_report: expected run directories or Run objects, got {type(r).__name__}")
    # open_runs opens paths and makes the names of all runs distinct (legends need that).
    return list(open_runs(items))


def load_report_view(runs: Any, title: str | None = None) -> ReportView:
    """Read runs from the store into a :class:`ReportView`.

    Args:
        runs: a run directory, a ``Run``, a ``Runs``, or a list of directories/``Run`` objects.
        title: report title; defaults to the run names.

    Returns:
        The view model. Cost: one store query per metric per run.

    Raises:
        ConfigError: nothing usable was given. StoreError: a run cannot be read.
    """
    views = []
    for run in _as_runs(runs):
        try:
            views.append(_run_view(run))
        except (KeyError, AttributeError, ValueError) as exc:
            raise StoreError(f"cannot read run {getattr(run, 'path', run)!s} for the report: {exc}") from exc
    if title is None:
        title = "Training diagnostics: " + ", ".join(v.name for v in views)
    return ReportView(title=str(title), runs=views)
