"""The panel base class, and the overlay helpers the panel families draw with.

A :class:`Panel` is shown when any of its metrics was recorded in any run; otherwise the report shows a
one-line "not recorded" note naming the metric IDs. Each panel carries two or three sentences on what it
measures and how to read it, and a link-free citation. The families (:mod:`.training`, :mod:`.curvature`,
:mod:`.layers`) import this module, which also re-exports the shared helpers of :mod:`.common`; the
ordered catalogue lives in the package's ``__init__``.

Time series are drawn as :class:`~..charts.Chart` specs (interactive in the page, static for print);
heatmaps are static.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..charts import Chart, ChartSink, Line, Mark, Rule
from ..figures import FigureSink, run_color
from ..views import ReportView
from .common import (
    HEATMAP_STEP_BINS,
    MAX_LAYER_LINES,
    MAX_MARKS_PER_KIND,
    STORY_ALERTS,
    alert_marks,
    alert_steps,
    choose_scale,
    esc,
    fmt,
    folded,
    grid,
    layer_matrix,
    run_label,
    runs_with,
    series_of,
    shared_range,
    signed_scale,
    size_text,
    table_html,
)
from .layerviews import layer_block

__all__ = [
    "HEATMAP_STEP_BINS", "MAX_LAYER_LINES", "MAX_MARKS_PER_KIND", "STORY_ALERTS", "Panel", "alert_marks",
    "alert_steps", "choose_scale", "esc", "fmt", "folded", "grid", "layer_block", "layer_matrix", "layer_rows",
    "overlay_chart", "run_label", "runs_with", "scalar_rows", "series_of", "shared_range", "signed_scale",
    "size_text", "table_html",
]


@dataclass(frozen=True)
class Panel:
    """One report section.

    Attributes:
        id: stable anchor (``panel-<id>``), used by tests and the table of contents.
        title: section heading.
        metrics: metric IDs; the panel is drawn when any of them was recorded.
        about: two or three sentences: what the metric is and how to read it.
        citation: the paper, written out, without links.
        draw: ``draw(view, sink) -> html`` drawing charts, figures and tables for the runs that recorded
            them; ``sink`` is a :class:`~..charts.ChartSink` (``sink.chart(Chart)``, ``sink.new`` and
            ``sink.render`` for matplotlib figures).
        uses_status: the panel also has something to show when only the status table has rows.
    """

    id: str
    title: str
    metrics: tuple[str, ...]
    about: str
    citation: str
    draw: Callable[[ReportView, FigureSink], str]
    uses_status: bool = False

    def present(self, view: ReportView) -> bool:
        """True when the panel has data in at least one run."""
        if self.uses_status and any(not r.status.empty for r in view.runs):
            return True
        return view.has(*self.metrics)

    def render(self, view: ReportView, sink: FigureSink) -> str:
        """Return the panel's ``<section>``: heading, explanation, citation, then figures; or, when
        nothing was recorded, the heading and one "not recorded" line."""
        ids = ", ".join(self.metrics)
        if not self.present(view):
            return (f'<section class="panel absent" id="panel-{self.id}">\n<h2>{esc(self.title)}</h2>\n'
                    f'<p class="not-recorded">Not recorded: no run has {esc(ids)}.</p>\n</section>\n')
        head = (f'<section class="panel" id="panel-{self.id}">\n<h2>{esc(self.title)}</h2>\n'
                f'<p class="about">{esc(self.about)}</p>\n<p class="cite">{esc(self.citation)}</p>\n')
        missing = [r.name for r in view.runs if not r.has(*self.metrics)
                   and not (self.uses_status and not r.status.empty)]
        body = self.draw(view, sink)
        if missing and len(view.runs) > 1:
            body += (f'<p class="not-recorded">Not recorded in run {esc(", ".join(missing))}: '
                     f'none of {esc(ids)}.</p>\n')
        return head + body + "</section>\n"


def overlay_chart(view: ReportView, metric: str, ylabel: str, *, title: str | None = None, key: str = "all",
                  aggregate: str | None = None, scale: str | None = None, decades: float = 2.0,
                  rules: list[Rule] | None = None, alerts: tuple[str, ...] = (), group: str = "",
                  note: str = "", height: int = 210, cols: int = 2, label: str = "") -> Chart:
    """One metric with every run overlaid (one colour per run)."""
    lines = []
    marks: list[Mark] = []
    for i, run in runs_with(view, metric):
        c = series_of(run, metric, key, aggregate)
        if c is None:
            continue
        lines.append(Line(run_label(view, run, label), c[0], c[1], run_color(i), run=i, keep=alert_steps(run),
                          width=1.6))
        marks += alert_marks(i, run, alerts) if alerts else []
    if scale is None:
        scale = choose_scale([ln.y for ln in lines], decades)
    return Chart(title or metric, ylabel, lines, rules or [], marks, scale=scale, group=group, note=note,
                 height=height, cols=cols)


def scalar_rows(view: ReportView, sink: ChartSink, specs: list[tuple[str, str]], *, key: str = "all",
                log: bool | None = None, alerts: bool = False, hlines: dict[str, float] | None = None,
                height: float = 2.3, group: str = "") -> str:
    """One chart per metric (``(metric, y label)``) with every run overlaid, two charts a row.

    ``log``: None picks a log axis when the values span more than two decades; True forces it (when
    the values are positive). ``hlines``: metric -> level of a labelled reference line.
    """
    out = []
    for metric, ylabel in specs:
        if not view.has(metric):
            continue
        rules = [Rule(level, f"{level:g}") for m, level in (hlines or {}).items() if m == metric]
        chart = overlay_chart(view, metric, ylabel, key=key, rules=rules,
                              alerts=STORY_ALERTS if alerts else (), group=group or f"rows-{metric}",
                              height=int(max(170, height * 80)))
        if log and all((np.asarray(ln.y)[np.isfinite(ln.y)] > 0).all() for ln in chart.lines):
            chart.scale = "log"
        elif log is False:
            chart.scale = "linear"
        out.append(sink.chart(chart))
    return grid(out, 2)


def layer_rows(view: ReportView, sink: ChartSink, specs: list[tuple[str, str]], *, log: bool = False,
               how: str = "mean", cmap: str = "viridis", vlim: tuple[float, float] | None = None,
               height: float = 2.2) -> str:
    """Per-layer views of each metric (``(metric, label)``); see :func:`.layerviews.layer_block`."""
    return "".join(layer_block(view, sink, metric, label, log=log, how=how, cmap=cmap, vlim=vlim)
                   for metric, label in specs if view.has(metric))
