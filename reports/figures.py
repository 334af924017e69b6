"""Matplotlib (Agg) figures rendered inline: deterministic SVG, or PNG when SVG would be large.

Output is made deterministic (fixed ``svg.hashsalt``, no date or creator metadata) so that two builds of
the same store produce the same bytes. Inline SVG is stripped of its XML prolog, namespaces and
metadata (they contain ``http://`` namespace URIs, which a self-contained report must not), its
element ids are made unique per figure, and text nodes are fully escaped. Labels are passed through
:func:`mpl_text` so that user strings are never interpreted as mathtext.
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import transforms  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from .downsample import downsample  # noqa: E402

RC = {
    "svg.hashsalt": "training-diagnostics",
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "legend.fontsize": 7.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
    "path.simplify": True,
    "lines.linewidth": 1.1,
    "image.interpolation": "nearest",
}

# Above this many drawn points a figure is rasterised: SVG costs ~40 bytes a vertex.
PNG_POINT_THRESHOLD = 12_000
# An SVG larger than this is re-rendered as PNG.
SVG_MAX_BYTES = 350_000
PNG_DPI = 110
# Figure label that asks the layout for room on the right (a legend placed outside the axes).
LEGEND_OUTSIDE = "legend-outside"

# Runs never take an alert's colour (ALERT_STYLE: orange warnings, red explosions, purple edge of
# stability, brown rank collapse), so an alert line is never mistaken for a run.
RUN_COLORS = ["#1f77b4", "#2ca02c", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#7b4173", "#637939",
              "#9c9ede", "#8c6d31"]

ALERT_STYLE = {
    "explosion_warning": dict(color="#ff7f0e", ls="--", label="explosion warning"),
    "loss_explosion": dict(color="#d62728", ls="-", label="loss explosion"),
    "edge_of_stability": dict(color="#9467bd", ls=":", label="edge of stability"),
    "rank_collapse": dict(color="#8c564b", ls="-.", label="rank collapse"),
    "nonfinite": dict(color="#000000", ls=":", label="non-finite"),
    "estimator_failed": dict(color="#7f7f7f", ls=":", label="estimator failed"),
}


def mpl_text(s: Any, limit: int = 48) -> str:
    """Return a user string safe to give matplotlib as a label.

    ``$`` is escaped so that it is never parsed as mathtext, a leading ``_`` (which hides legend
    entries) is protected, and long names are shortened. XML escaping happens on output.
    """
    s = str(s)
    if len(s) > limit:
        s = s[: limit - 1] + "\u2026"
    s = s.replace("\\", "\\\\").replace("$", r"\$")
    if s.startswith("_"):
        s = " " + s
    return s


def run_color(i: int) -> str:
    """Colour of the i-th run in overlaid plots."""
    return RUN_COLORS[i % len(RUN_COLORS)]


def layer_colors(n: int) -> list[Any]:
    """n colours along a perceptual map (first layer dark, last light)."""
    cmap = plt.get_cmap("viridis")
    return [cmap(x) for x in np.linspace(0.0, 0.9, max(n, 1))]


class FigureSink:
    """Renders figures to inline HTML and numbers them so element ids never collide."""

    def __init__(self) -> None:
        self.count = 0

    def new(self, nrows: int = 1, ncols: int = 1, *, height: float = 2.6, width: float = 9.0,
            sharex: bool = True, squeeze: bool = False) -> tuple[Any, Any]:
        """Create a figure with the report's style; returns ``(fig, axes)`` (axes a 2-D array)."""
        with plt.rc_context(RC):
            fig, axes = plt.subplots(nrows, ncols, figsize=(width, height * nrows), sharex=sharex,
                                     squeeze=squeeze)
        return fig, axes

    def render(self, fig: Any, alt: str, *, force_png: bool = False) -> str:
        """Render and close ``fig``; return a ``<figure>`` element holding inline SVG or a PNG data URI.

        Cost: one SVG render, plus one PNG render when the SVG is too large or the figure has many points.
        """
        self.count += 1
        prefix = f"f{self.count}-"
        try:
            with plt.rc_context(RC):
                _layout(fig)
                use_png = force_png or _num_points(fig) > PNG_POINT_THRESHOLD
                body = None
                if not use_png:
                    buf = io.StringIO()
                    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
                    svg = buf.getvalue()
                    if len(svg) <= SVG_MAX_BYTES:
                        body = clean_svg(svg, prefix, alt)
                if body is None:
                    buf = io.BytesIO()
                    fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
                    data = base64.b64encode(buf.getvalue()).decode("ascii")
                    body = f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        finally:
            plt.close(fig)
        return f'<figure class="fig">{body}</figure>'


def _plain_log_ticks(ax: Any) -> None:
    """Plain-text tick labels on log and symlog axes: matplotlib's default mathtext labels cost about
    25 ms each to lay out, which dominates a large report."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "log":
            axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        elif scale == "symlog":
            axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.3g}"))
            axis.set_minor_formatter(NullFormatter())


def _layout(fig: Any) -> None:
    """Fixed margins in inches instead of constrained layout (which measures every tick label several
    times and took most of the rendering time). Room is left for long y tick labels (layer names) and
    for legends placed to the right of the axes."""
    w, h = fig.get_size_inches()
    main = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax in main:
        _plain_log_ticks(ax)
    if not main or fig.get_layout_engine() is not None:
        # figures made with layout="constrained" (heatmaps side by side) lay themselves out
        return
    gs = main[0].get_subplotspec().get_gridspec() if main[0].get_subplotspec() else None
    nrows = gs.nrows if gs is not None else 1
    ncols = gs.ncols if gs is not None else 1
    longest = 0
    for ax in main:
        labels = [t.get_text() for t in ax.get_yticklabels()]
        longest = max([longest] + [len(x) for x in labels])
    left = 0.75 if longest <= 8 else min(2.2, 0.35 + 0.055 * longest)
    outside = fig.get_label() == LEGEND_OUTSIDE
    colorbar = len(main) < len(fig.axes)
    right = 2.0 if outside else (0.75 if colorbar else 0.25)
    suptitle = fig._suptitle is not None
    top = 0.3 + (0.25 if suptitle else 0.0)
    bottom = 0.5
    row_h = max((h - top - bottom) / nrows, 0.5)
    hspace = 0.75 / max(row_h - 0.75, 0.3) if nrows > 1 else 0.2
    wspace = 0.45 if ncols > 1 else 0.2
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        hspace=hspace, wspace=wspace)


def _num_points(fig: Any) -> int:
    n = 0
    for ax in fig.axes:
        for line in ax.get_lines():
            n += len(line.get_xdata())
        for coll in ax.collections:
            try:
                n += len(coll.get_offsets())
            except (TypeError, AttributeError):
                pass
    return n


_ID_RE = re.compile(r'\bid="([^"]+)"')


def clean_svg(svg: str, prefix: str, alt: str) -> str:
    """Make matplotlib's SVG safe and unique for inlining in HTML.

    Removes the XML prolog, DOCTYPE, ``<metadata>``, comments and namespace declarations (all carry
    ``http://`` URIs); prefixes element ids so several figures can share one document; escapes quotes
    in text nodes (matplotlib escapes only ``<``, ``>`` and ``&``); adds an accessible label.
    """
    start = svg.find("<svg")
    svg = svg[start:]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r'\s+version="1\.1"', "", svg, count=1)
    ids = set(_ID_RE.findall(svg))
    if ids:
        svg = _ID_RE.sub(lambda m: f'id="{prefix}{m.group(1)}"', svg)
        svg = re.sub(r'url\(#([^)]+)\)', lambda m: f"url(#{prefix}{m.group(1)})" if m.group(1) in ids
                     else m.group(0), svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}{m.group(1)}"' if m.group(1) in ids
                     else m.group(0), svg)
    svg = re.sub(r"(<text\b[^>]*>)([^<]*)(</text>)",
                 lambda m: m.group(1) + m.group(2).replace('"', "&quot;").replace("'", "&#x27;") + m.group(3),
                 svg)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(alt)}" ', 1)
    return svg.strip()


def finite_or_nan(values: np.ndarray) -> np.ndarray:
    """Copy of ``values`` with inf replaced by NaN (so lines break instead of shooting off the axes)."""
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, np.nan)


def plot_curve(ax: Any, steps: np.ndarray, values: np.ndarray, *, label: str | None = None,
               color: Any = None, keep_steps: np.ndarray | None = None, buckets: int = 800,
               **kw: Any) -> None:
    """Draw one series: min/max-downsampled, non-finite values as gaps plus markers along the bottom."""
    s, v = downsample(np.asarray(steps), np.asarray(values, dtype=np.float64), buckets, keep_steps)
    marker = "o" if len(s) <= 60 else None
    ax.plot(s, finite_or_nan(v), label=mpl_text(label) if label is not None else None, color=color,
            marker=marker, markersize=2.5, **kw)
    bad = ~np.isfinite(v)
    if bad.any():
        trans = transforms.blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(s[bad], np.full(bad.sum(), 0.02), ls="none", marker="x", color="black", markersize=4,
                transform=trans, clip_on=False)


def mark_alerts(ax: Any, events: list[Any], kinds: tuple[str, ...] = tuple(ALERT_STYLE),
                max_lines: int = 60) -> set[str]:
    """Draw vertical lines at alert steps; returns the kinds drawn (for the legend)."""
    drawn: set[str] = set()
    for kind in kinds:
        steps = np.unique([e.step for e in events if e.kind == kind])
        if not len(steps):
            continue
        if len(steps) > max_lines:
            # keep the first alerts and an even spread of the rest: the first is what matters
            steps = np.unique(np.concatenate([steps[:10], steps[np.linspace(10, len(steps) - 1,
                                                                            max_lines - 10).astype(int)]]))
        style = ALERT_STYLE[kind]
        for st in steps:
            ax.axvline(st, color=style["color"], ls=style["ls"], lw=0.8, alpha=0.7)
        drawn.add(kind)
    return drawn


def alert_legend_handles(kinds: set[str]) -> list[Any]:
    """Legend proxies for the alert kinds drawn."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=ALERT_STYLE[k]["color"], ls=ALERT_STYLE[k]["ls"], lw=0.8,
                   label=ALERT_STYLE[k]["label"]) for k in ALERT_STYLE if k in kinds]


def auto_log(ax: Any, arrays: list[np.ndarray], ratio: float = 100.0) -> None:
    """Use a log y-axis when every finite value is positive and they span more than ``ratio``."""
    vals = [a[np.isfinite(a)] for a in arrays if len(a)]
    vals = [a for a in vals if len(a)]
    if not vals:
        return
    v = np.concatenate(vals)
    if v.min() > 0 and v.max() / v.min() > ratio:
        ax.set_yscale("log")


def heatmap(ax: Any, matrix: np.ndarray, edges: np.ndarray, labels: list[str], *, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, norm: Any = None, cbar_label: str = "",
            fig: Any = None) -> None:
    """Draw a layer x step-bin heatmap; NaN cells (not recorded) are light grey."""
    cm = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
    data = np.ma.masked_invalid(matrix)
    if norm is None:
        norm = Normalize(vmin=vmin, vmax=vmax)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cm, norm=norm,
                   extent=(edges[0], edges[-1], len(labels) - 0.5, -0.5))
    ax.grid(False)
    if len(labels) <= 40:
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels([mpl_text(x, 32) for x in labels], fontsize=6.5)
    else:
        ticks = np.linspace(0, len(labels) - 1, 12).astype(int)
        ax.set_yticks(ticks)
        ax.set_yticklabels([mpl_text(labels[t], 32) for t in ticks], fontsize=6.5)
    if fig is not None:
        cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
        cb.set_label(cbar_label)
