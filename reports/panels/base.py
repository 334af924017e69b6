"""The panel base class and the helpers every panel family shares.

A :class:`Panel` is shown when any of its metrics was recorded in any run; otherwise the report shows a
one-line "not recorded" note naming the metric IDs. Each panel carries two or three sentences on what it
measures and how to read it, and a link-free citation. The families (:mod:`.training`, :mod:`.curvature`,
:mod:`.layers`) import this module only; the ordered catalogue lives in the package's ``__init__``.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm, Normalize

from ..downsample import bin_series, midpoint_edges, step_bins
from ..figures import (
    LEGEND_OUTSIDE,
    FigureSink,
    alert_legend_handles,
    auto_log,
    heatmap,
    layer_colors,
    mark_alerts,
    mpl_text,
    plot_curve,
    run_color,
)
from ..views import ReportView, RunView

# Per-layer series are drawn as lines up to this many layers, as a layer x step heatmap beyond.
MAX_LAYER_LINES = 10
HEATMAP_STEP_BINS = 400


@dataclass(frozen=True)
class Panel:
    """One report section.

    Attributes:
        id: stable anchor (``panel-<id>``), used by tests and the table of contents.
        title: section heading.
        metrics: metric IDs; the panel is drawn when any of them was recorded.
        about: two or three sentences: what the metric is and how to read it.
        citation: the paper, written out, without links.
        draw: ``draw(view, sink) -> html`` drawing figures and tables for the runs that recorded them.
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
        """Return the panel's ``<section>``: heading, explanation, citation, then figures or the note."""
        head = (f'<section class="panel" id="panel-{self.id}">\n<h2>{esc(self.title)}</h2>\n'
                f'<p class="about">{esc(self.about)}</p>\n<p class="cite">{esc(self.citation)}</p>\n')
        ids = ", ".join(self.metrics)
        if not self.present(view):
            body = f'<p class="not-recorded">Not recorded: no run has {esc(ids)}.</p>\n'
        else:
            missing = [r.name for r in view.runs if not r.has(*self.metrics)
                       and not (self.uses_status and not r.status.empty)]
            body = self.draw(view, sink)
            if missing and len(view.runs) > 1:
                body += (f'<p class="not-recorded">Not recorded in run {esc(", ".join(missing))}: '
                         f'none of {esc(ids)}.</p>\n')
        return head + body + "</section>\n"


# --- helpers shared by the panels -------------------------------------------------------------------


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


def add_legend(ax: Any, extra: list[Any] | None = None, **kw: Any) -> None:
    """Legend of labelled lines plus proxy handles; nothing when there is nothing to label."""
    handles, labels = ax.get_legend_handles_labels()
    for h in extra or []:
        handles.append(h)
        labels.append(h.get_label())
    if handles:
        if "bbox_to_anchor" in kw:
            ax.figure.set_label(LEGEND_OUTSIDE)  # the layout reserves room on the right
        ax.legend(handles, labels, loc=kw.pop("loc", "best"), frameon=False, **kw)


def scalar_rows(view: ReportView, sink: FigureSink, specs: list[tuple[str, str]], *,
                key: str = "all", log: bool | None = None, alerts: bool = False,
                hlines: dict[str, float] | None = None, height: float = 2.3) -> str:
    """One row per metric (``(metric, y label)``) with every run overlaid; returns a figure or ''."""
    specs = [(m, lab) for m, lab in specs if view.has(m)]
    if not specs:
        return ""
    fig, axes = sink.new(len(specs), 1, height=height)
    for ax, (metric, ylabel) in zip(axes[:, 0], specs):
        arrays = []
        for i, run in runs_with(view, metric):
            md = run.metric(metric)
            c = md.curve(key) if md is not None else None
            if c is None and md is not None:
                first = md.first_curve()
                c = (first[1], first[2]) if first else None
            if c is None:
                continue
            plot_curve(ax, c[0], c[1], label=run_label(view, run, ""), color=run_color(i),
                       keep_steps=alert_steps(run))
            arrays.append(c[1])
        if log is None:
            auto_log(ax, arrays)
        elif log:
            pos = [a[np.isfinite(a) & (a > 0)] for a in arrays]
            if any(len(p) for p in pos):
                ax.set_yscale("log")
        for metric_name, level in (hlines or {}).items():
            if metric_name == metric:
                ax.axhline(level, color="black", lw=0.8, ls="--")
        drawn: set[str] = set()
        if alerts:
            for _, run in runs_with(view, metric):
                drawn |= mark_alerts(ax, run.events)
        ax.set_ylabel(mpl_text(ylabel))
        ax.set_title(mpl_text(metric), loc="left")
        if len(view.runs) > 1 or drawn:
            add_legend(ax, alert_legend_handles(drawn), fontsize=7)
    axes[-1, 0].set_xlabel("step")
    return sink.render(fig, ", ".join(m for m, _ in specs) + " over steps")


def layer_matrix(run: RunView, metric: str, keys: list[str], how: str = "mean",
                 nbins: int = HEATMAP_STEP_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Bin one per-layer metric onto step bins: returns ``(matrix [layers, bins], edges)``."""
    md = run.metric(metric)
    steps = np.unique(np.concatenate([md.by_key[k].steps for k in keys]))
    if len(steps) <= nbins:
        # one column per recorded step (metrics recorded every few steps would leave empty bins)
        edges = midpoint_edges(steps)
    else:
        edges = step_bins(int(steps[0]), int(steps[-1]), nbins)
    curves = [md.curve(k) for k in keys]
    mat = np.vstack([bin_series(*c, edges, how) if c else np.full(len(edges) - 1, np.nan) for c in curves])
    return mat, edges


def layer_rows(view: ReportView, sink: FigureSink, specs: list[tuple[str, str]], *, log: bool = False,
               how: str = "mean", cmap: str = "viridis", vlim: tuple[float, float] | None = None,
               height: float = 2.2) -> str:
    """One row per (metric, run): lines per layer (few layers) or a binned layer x step heatmap.

    The ``"all"`` key, when present, is drawn as a thick black line in line mode.
    """
    rows = [(m, lab, i, r) for m, lab in specs for i, r in runs_with(view, m)]
    if not rows:
        return ""
    fig, axes = sink.new(len(rows), 1, height=height)
    for ax, (metric, ylabel, _i, run) in zip(axes[:, 0], rows):
        md = run.metric(metric)
        layers = md.layer_keys()
        title = metric if len(view.runs) == 1 else f"{metric}: {run.name}"
        ax.set_title(mpl_text(title, 80), loc="left")
        keep = alert_steps(run)
        if len(layers) > MAX_LAYER_LINES:
            mat, edges = layer_matrix(run, metric, layers, how)
            norm = None
            fin = mat[np.isfinite(mat)]
            if log and len(fin) and fin.min() > 0 and fin.max() / fin.min() > 10:
                norm = LogNorm(vmin=fin.min(), vmax=fin.max())
            elif vlim is not None:
                norm = Normalize(*vlim)
            heatmap(ax, mat, edges, layers, cmap=cmap, norm=norm, cbar_label=mpl_text(ylabel), fig=fig)
            ax.set_ylabel("layer")
            continue
        colors = layer_colors(len(layers))
        arrays = []
        for k, color in zip(layers, colors):
            c = md.curve(k)
            if c is not None:
                plot_curve(ax, c[0], c[1], label=k, color=color, keep_steps=keep)
                arrays.append(c[1])
        c = md.curve("all")
        if c is not None:
            plot_curve(ax, c[0], c[1], label="all", color="black", keep_steps=keep, lw=1.8)
            arrays.append(c[1])
        if log:
            auto_log(ax, arrays, ratio=1.0)
        if vlim is not None:
            ax.set_ylim(vlim[0] - 0.03 * (vlim[1] - vlim[0]), vlim[1] + 0.03 * (vlim[1] - vlim[0]))
        ax.set_ylabel(mpl_text(ylabel))
        add_legend(ax, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6.5)
    axes[-1, 0].set_xlabel("step")
    return sink.render(fig, ", ".join(m for m, _ in specs) + " per layer over steps")
