"""Interactive time-series charts: a plain spec, drawn twice.

A :class:`Chart` (lines, threshold rules, alert marks, bands) is written into the page as JSON for the
vendored uPlot library (zoom by dragging, double-click to reset, values under the cursor, series and run
toggles) and, for readers without scripts and for printing, as a static SVG next to it
(:mod:`.svg`). Both come from the same downsampled arrays, so they show the same points.

The JSON sits in ``<script type="application/json">`` elements; :func:`json_for_html` escapes ``<``,
``>``, ``&`` and U+2028/U+2029 so that no value (a run name, a layer name) can end the element or be
read as markup. Scripts are inline: uPlot's own file (``vendor/``, MIT licence) and ``static/report.js``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from .downsample import downsample
from .figures import ALERT_STYLE, FigureSink
from .svg import legend_html, line_chart_svg

UPLOT_VERSION = "1.6.32"
_HERE = Path(__file__).resolve().parent

# Points kept per series in the interactive chart: each bucket's minimum and maximum, so up to about
# twice this many; enough to zoom into a 100,000-step run and still see every spike's height.
LIVE_BUCKETS = 1500
# The static fallback needs fewer: it is read at page width.
STATIC_BUCKETS = 600
# Dash patterns in CSS pixels, shared by the live and the static chart.
DASHES = {"solid": None, "dash": (6, 4), "dot": (2, 3), "dashdot": (7, 3, 2, 3)}
_MPL_DASH = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-."}


@dataclass
class Line:
    """One series. ``run`` (the run's position) lets the page's run toggles hide it."""

    label: str
    x: np.ndarray
    y: np.ndarray
    color: str
    dash: str = "solid"
    width: float = 1.4
    run: int | None = None
    points: bool = False  # markers only (e.g. estimates that did not converge)
    markers: bool = True  # dots on the points when there are few (off for band edges)
    keep: np.ndarray | None = None  # steps the downsampling must keep (alerts)
    legend: bool = True  # False: drawn, but with no legend entry (a run's minor lines under one named line)


@dataclass
class Rule:
    """A horizontal reference line (a threshold) with the label that says what it is."""

    y: float
    label: str
    color: str = "#333333"
    dash: str = "dash"
    run: int | None = None


@dataclass
class Mark:
    """A vertical line at an alert's step; ``kind`` picks the style of :data:`figures.ALERT_STYLE`."""

    x: float
    kind: str
    run: int | None = None


@dataclass
class Chart:
    """What one chart shows. ``scale``: "linear", "log" or "asinh" (symmetric log, for signed values
    spanning decades; ``linthresh`` is its linear range). ``yrange`` fixes the y-axis (for comparing
    small multiples); ``bands`` fill between two lines, given by their positions in ``lines``."""

    title: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    scale: str = "linear"
    linthresh: float | None = None
    yrange: tuple[float, float] | None = None
    bands: list[tuple[int, int, str]] = field(default_factory=list)
    note: str = ""
    group: str = ""
    height: int = 210
    cols: int = 2  # charts side by side where it is shown: sets the static figure's width

    @property
    def empty(self) -> bool:
        return not any(len(line.x) for line in self.lines)


# --- JSON for the page ---------------------------------------------------------------------------------

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_for_html(obj: Any) -> str:
    """JSON text safe inside a ``<script type="application/json">`` element.

    ``<``, ``>`` and ``&`` only occur inside JSON strings, where ``\\uXXXX`` escapes mean the same
    characters to ``JSON.parse``; U+2028/2029 are escaped because older parsers treat them as newlines.
    NaN and infinities are not valid JSON and are refused.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for ch, rep in _JSON_ESCAPES.items():
        text = text.replace(ch, rep)
    return text


def _numbers(values: np.ndarray) -> list[float | None]:
    """Values for JSON: 6 significant digits (what a reader can use, and a third of the bytes of full
    precision), non-finite values as null (drawn as gaps)."""
    v = np.asarray(values, dtype=np.float64)
    out: list[float | None] = []
    for x in v.tolist():
        out.append(float(f"{x:.6g}") if math.isfinite(x) else None)
    return out


def _steps(values: np.ndarray) -> list[float]:
    s = np.asarray(values, dtype=np.float64)
    if np.all(s == np.round(s)):
        return [int(x) for x in s.tolist()]
    return [float(f"{x:.8g}") for x in s.tolist()]


def _reduce(line: Line, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(line.x)
    y = np.asarray(line.y, dtype=np.float64)
    if not len(x):
        return x, y
    if len(x) > 1 and np.any(np.diff(x) < 0):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
    return downsample(x, y, buckets, line.keep)


def chart_payload(chart: Chart, reduced: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """The JSON the page's script turns into a uPlot chart."""
    series = []
    for line, (x, y) in zip(chart.lines, reduced):
        bad = ~np.isfinite(y)
        series.append({
            "label": line.label, "color": line.color, "dash": DASHES.get(line.dash), "width": line.width,
            "run": line.run, "points": line.points, "markers": line.markers, "x": _steps(x), "y": _numbers(y),
            # steps whose value is NaN or inf: crosses along the bottom, as in the static figure
            "bad": _steps(x[bad]) if bad.any() else [],
        })
        if not line.legend:
            series[-1]["legend"] = False
    return {
        "title": chart.title, "ylabel": chart.ylabel, "scale": chart.scale,
        # 6 significant digits like the values: the last bits of a float vary with the CPU's arithmetic
        "linthresh": None if chart.linthresh is None else float(f"{chart.linthresh:.6g}"),
        "yrange": list(chart.yrange) if chart.yrange else None, "group": chart.group, "height": chart.height,
        "series": series,
        "rules": [{"y": float(f"{r.y:.6g}"), "label": r.label, "color": r.color, "dash": DASHES.get(r.dash),
                   "run": r.run} for r in chart.rules if math.isfinite(r.y)],
        "marks": [{"x": float(m.x), "label": ALERT_STYLE[m.kind]["label"], "color": ALERT_STYLE[m.kind]["color"],
                   "dash": DASHES[_css_dash(ALERT_STYLE[m.kind]["ls"])], "run": m.run} for m in chart.marks],
        "bands": [[a, b, color] for a, b, color in chart.bands],
    }


def _css_dash(ls: str) -> str:
    return {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}.get(ls, "solid")


# --- the static figure ---------------------------------------------------------------------------------

# SVG width of a chart by the number of charts side by side (the page is at most 1320 px wide).
STATIC_WIDTH = {1: 1180, 2: 600, 3: 400, 4: 300}


def _static(chart: Chart, reduced: list[tuple[np.ndarray, np.ndarray]], uid: str) -> str:
    """The chart as inline SVG with an HTML title and legend (for no-script readers and print)."""
    series = []
    for line, (x, y) in zip(chart.lines, reduced):
        if len(x) > 2 * STATIC_BUCKETS + 2:
            x, y = downsample(x, y, STATIC_BUCKETS, line.keep)
        series.append({"x": x, "y": y, "color": line.color, "dash": DASHES.get(line.dash), "width": line.width,
                       "points": line.points, "markers": line.markers})
    marks = [{"x": m.x, "color": ALERT_STYLE[m.kind]["color"], "dash": DASHES[_css_dash(ALERT_STYLE[m.kind]["ls"])]}
             for m in chart.marks]
    rules = [{"y": r.y, "label": r.label, "color": r.color, "dash": DASHES.get(r.dash)} for r in chart.rules
             if math.isfinite(r.y)]
    width = STATIC_WIDTH.get(chart.cols, 600)
    svg = line_chart_svg(series, width=width, height=chart.height, scale=chart.scale, linthresh=chart.linthresh,
                         yrange=chart.yrange, rules=rules, marks=marks, bands=chart.bands, ylabel=chart.ylabel,
                         alt=chart.title, uid=uid)
    entries = [(ln.label, ln.color, DASHES.get(ln.dash), ln.points) for ln in chart.lines if len(ln.x) and ln.legend]
    seen = set()
    for m in chart.marks:
        style = ALERT_STYLE[m.kind]
        if m.kind not in seen:
            seen.add(m.kind)
            entries.append((style["label"], style["color"], style["ls"] != "-", False))
    return f'<div class="stitle">{_esc(chart.title)}</div>{svg}{legend_html(entries)}'


# --- the sink -------------------------------------------------------------------------------------------


class ChartSink(FigureSink):
    """A :class:`FigureSink` that also renders :class:`Chart` specs (interactive plus static)."""

    def __init__(self) -> None:
        super().__init__()
        self.charts = 0

    def chart(self, chart: Chart) -> str:
        """Return the chart's HTML: a live container, its JSON and the static figure. '' when empty."""
        if chart.empty:
            return ""
        self.charts += 1
        cid = f"chart-{self.charts}"
        reduced = [_reduce(line, LIVE_BUCKETS) for line in chart.lines]
        payload = chart_payload(chart, reduced)
        static = _static(chart, reduced, cid)
        note = f'<p class="chart-note">{_esc(chart.note)}</p>' if chart.note else ""
        cls = "chart"
        return (f'<div class="{cls}" id="{cid}" data-group="{_esc(chart.group)}">'
                f'<div class="live" style="min-height:{int(chart.height) + 60}px"></div>'
                f'<div class="static">{static}</div>{note}'
                f'<script type="application/json" class="chart-data">{json_for_html(payload)}</script></div>\n')


def _esc(x: Any) -> str:
    import html

    return html.escape(str(x), quote=True)


# --- the scripts and styles inlined into every report -------------------------------------------------


@cache
def _read(rel: str) -> str:
    return (_HERE / rel).read_text(encoding="utf-8")


def uplot_js() -> str:
    """uPlot's minified script (MIT licence, ``vendor/LICENSE``)."""
    return _read("vendor/uPlot.iife.min.js")


def uplot_css() -> str:
    return _read("vendor/uPlot.min.css")


def report_js() -> str:
    """The page's own script: builds the charts from their JSON, run toggles, zoom sync."""
    return _read("static/report.js")


def inline_script(code: str) -> str:
    """A ``<script>`` element holding ``code``; refuses code that could end the element early."""
    low = code.lower()
    if "</script" in low or "<!--" in low:
        raise ValueError("inline script contains '</script' or '<!--'")
    return f"<script>{code}</script>\n"
