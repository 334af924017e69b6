"""Helpers every panel family shares: escaping and formatting, layout, alert marks, scales, series.

:mod:`.base` (the :class:`~.base.Panel` class and the overlay helpers) and :mod:`.layerviews` (per-layer
views) build on this module; panels import them through :mod:`.base`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..charts import Mark
from ..downsample import bin_series, midpoint_edges, step_bins
from ..figures import ALERT_STYLE
from ..views import ReportView, RunView

# Per-layer series are drawn as lines up to this many layers; beyond, the most changed layers are drawn
# as lines and the full layer x step matrix is folded below them.
MAX_LAYER_LINES = 10
HEATMAP_STEP_BINS = 400
# Alert kinds marked on the loss-like charts (rank collapse has its own finding and panel).
STORY_ALERTS = ("explosion_warning", "loss_explosion", "edge_of_stability", "nonfinite")
MAX_MARKS_PER_KIND = 40


# --- small helpers ---------------------------------------------------------------------------------------


def esc(x: Any) -> str:
    """HTML-escape any value's string form (quotes included)."""
    return html.escape(str(x), quote=True)


def fmt(x: Any) -> str:
    """Format a number for a table: 4 significant digits, 'NaN', '+inf' / '-inf' spelled out."""
    if x is None:
        return ""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if np.isnan(v):
        return "NaN"
    if np.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


def size_text(v: float) -> str:
    """A ratio or eigenvalue in prose, read for its size: "0.16", "9,422", "3.58e+08"."""
    if 100 <= abs(v) < 1e6:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) >= 1e6 else f"{v:.2g}"


def table_html(header: list[str], rows: list[list[Any]], cls: str = "data") -> str:
    """An HTML table; every cell escaped. A cell given as ``("failed", text)`` is styled as failed."""
    out = [f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, tuple) and len(c) == 2:
                cells.append(f'<td class="{esc(c[0])}">{esc(c[1])}</td>')
            else:
                cells.append(f"<td>{esc(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out) + "\n"


def folded(summary: str, body: str, *, open_: bool = False) -> str:
    """``body`` inside a ``<details>`` element; '' when there is no body."""
    if not body:
        return ""
    return f'<details class="fold"{" open" if open_ else ""}><summary>{esc(summary)}</summary>\n{body}</details>\n'


def grid(items: Iterable[str], cols: int = 2) -> str:
    """Charts side by side (``cols`` per row; one column on narrow screens)."""
    items = [i for i in items if i]
    if not items:
        return ""
    return f'<div class="grid g{max(1, min(cols, 4))}">' + "".join(items) + "</div>\n"


def alert_steps(run: RunView) -> np.ndarray:
    """Steps of the run's alerts (kept by downsampling)."""
    return np.unique(np.array([e.step for e in run.events], dtype=np.int64))


def runs_with(view: ReportView, *metrics: str) -> list[tuple[int, RunView]]:
    """(position, run) of runs that recorded any of the metrics; position fixes the run's colour."""
    return [(i, r) for i, r in enumerate(view.runs) if r.has(*metrics)]


def run_label(view: ReportView, run: RunView, what: str = "") -> str:
    """Legend label: the run name when several runs are overlaid, else ``what``."""
    if len(view.runs) > 1:
        return f"{run.name} {what}".strip()
    return what or run.name


def alert_marks(i: int, run: RunView, kinds: tuple[str, ...] = STORY_ALERTS) -> list[Mark]:
    """Vertical marks at the run's alert steps, one per step and kind; a kind with very many alerts
    keeps its first ones and an even spread of the rest (the first is what matters)."""
    out = []
    for kind in kinds:
        if kind not in ALERT_STYLE:
            continue
        steps = np.unique([e.step for e in run.events if e.kind == kind])
        if len(steps) > MAX_MARKS_PER_KIND:
            spread = steps[np.linspace(10, len(steps) - 1, MAX_MARKS_PER_KIND - 10).astype(int)]
            steps = np.unique(np.concatenate([steps[:10], spread]))
        out += [Mark(float(s), kind, i) for s in steps]
    return out


def choose_scale(arrays: Iterable[np.ndarray], decades: float = 2.0) -> str:
    """"log" when every finite value is positive and they span more than ``decades`` decades."""
    vals = [np.asarray(a, dtype=np.float64) for a in arrays]
    vals = [a[np.isfinite(a)] for a in vals if len(a)]
    vals = [a for a in vals if len(a)]
    if not vals:
        return "linear"
    v = np.concatenate(vals)
    if v.min() > 0 and v.max() / v.min() > 10.0 ** decades:
        return "log"
    return "linear"


def signed_scale(arrays: Iterable[np.ndarray], decades: float = 2.0) -> tuple[str, float | None]:
    """Like :func:`choose_scale` for quantities read on ratios that may also be 0 or negative (a norm, the
    bias-corrected GSNR, whose estimate falls below 0 where the signal is below the noise of its mean):
    "log" when all positive, else "asinh" (symmetric: linear within ``linthresh`` of 0, logarithmic
    beyond it on both sides) when the nonzero magnitudes span more than ``decades`` decades; "linear"
    otherwise, so that one layer's spike does not flatten every other line against 0."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    scale = choose_scale(arrays, decades)
    if scale == "log":
        return scale, None
    vals = [a[np.isfinite(a)] for a in arrays if len(a)]
    v = np.concatenate(vals) if vals else np.zeros(0)
    mag = np.abs(v)
    pos = mag[mag > 0]
    if len(pos) and pos.max() / pos.min() > 10.0 ** decades:
        return "asinh", float(np.quantile(pos, 0.05))
    return "linear", None


def shared_range(arrays: Iterable[np.ndarray], scale: str) -> tuple[float, float] | None:
    """A y-range holding every finite value, with a small margin: the same axis for small multiples."""
    vals = [np.asarray(a, dtype=np.float64) for a in arrays]
    vals = [a[np.isfinite(a)] for a in vals if len(a)]
    vals = [a for a in vals if len(a)]
    if not vals:
        return None
    v = np.concatenate(vals)
    lo, hi = float(v.min()), float(v.max())
    if scale == "log":
        lo = max(lo, float(v[v > 0].min()) if (v > 0).any() else 1e-12)
        return lo / 1.15, hi * 1.15
    pad = 0.04 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1e-9)
    return lo - pad, hi + pad


def series_of(run: RunView, metric: str, key: str = "all",
              aggregate: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """One curve of a metric: ``key`` (falling back to the first key), or with ``aggregate="median"``
    the median over the layers at each step (the ``"all"`` key when the metric has no layers)."""
    md = run.metric(metric)
    if md is None:
        return None
    if aggregate is None or not md.layer_keys():
        c = md.curve(key)
        if c is None:
            first = md.first_curve()
            c = (first[1], first[2]) if first else None
        return c
    curves = [md.curve(k) for k in md.layer_keys()]
    curves = [c for c in curves if c is not None]
    if not curves:
        return None
    df = pd.DataFrame({"s": np.concatenate([c[0] for c in curves]),
                       "v": np.concatenate([c[1] for c in curves])})
    df["v"] = df["v"].where(np.isfinite(df["v"]))
    med = df.groupby("s", sort=True)["v"].median()
    return med.index.to_numpy(), med.to_numpy(dtype=np.float64)


# --- binning for heatmaps ---------------------------------------------------------------------------------


def layer_matrix(run: RunView, metric: str, keys: list[str], how: str = "mean",
                 nbins: int = HEATMAP_STEP_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Bin one per-layer metric onto step bins: returns ``(matrix [layers, bins], edges)``.

    The edges start at the first recorded step and end at the last (one column per recorded step when
    there are few), so the axis never shows steps before the run began.
    """
    md = run.metric(metric)
    steps = np.unique(np.concatenate([md.by_key[k].steps for k in keys if k in md.by_key]))
    if len(steps) <= nbins:
        edges = midpoint_edges(steps)
        if len(steps) > 1:
            # bins are half-open: the last edge sits just past the last step so that it is counted
            edges[0], edges[-1] = steps[0], np.nextafter(float(steps[-1]), np.inf)
    else:
        edges = step_bins(int(steps[0]), int(steps[-1]), nbins)
    curves = [md.curve(k) for k in keys]
    mat = np.vstack([bin_series(*c, edges, how) if c else np.full(len(edges) - 1, np.nan) for c in curves])
    return mat, edges
