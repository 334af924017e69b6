"""Per-layer metrics, readable with many layers.

Up to :data:`~.base.MAX_LAYER_LINES` layers every layer is a line. Beyond, the default view is the few
layers whose value changed most (lines, one chart per run side by side, one y-axis for all runs), and
the full layer x step matrix is folded under it: one figure per metric, runs side by side on one
colour scale, row labels grouped by block (``blocks.3``) and thinned to what fits.
"""

from __future__ import annotations

import math

import numpy as np

from ..charts import Chart, ChartSink, Line
from ..figures import ALERT_STYLE
from ..svg import Scale, colorbar_svg, heatmap_svg, label_font, legend_html
from ..views import ReportView, RunView
from .common import (
    MAX_LAYER_LINES,
    alert_marks,
    alert_steps,
    esc,
    folded,
    grid,
    layer_matrix,
    runs_with,
    shared_range,
    signed_scale,
)

MOST_CHANGED = 6
HEAT_RIGHT = 14  # heatmap_svg's right margin
# Per-layer series with more probes than this are drawn as a running median in the most-changed view
# (per-step statistics such as sign diversity jump between probes; the heatmap keeps the raw bins).
SMOOTH_ABOVE = 100
# Distinct colours for a handful of layers (the run colours are not needed inside one run's chart); none
# is an alert's colour (orange warnings, red explosions, purple edge of stability, brown rank collapse).
LAYER_PALETTE = ["#1f77b4", "#2ca02c", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#7b4173", "#637939",
                 "#9c9ede", "#8c6d31"]
# Above this many rows the row labels are grouped by block.
GROUP_LABELS_ABOVE = 20
ROW_INCHES = 0.13
MAX_HEATMAP_INCHES = 6.5


def layers_of(run: RunView, metric: str) -> list[str]:
    """The metric's layer keys in model order (or its keys when it has no layers)."""
    md = run.metric(metric)
    if md is None:
        return []
    return md.layer_keys() or md.keys()


def change_score(values: np.ndarray, log: bool) -> float:
    """How much a layer's value moved: |median of its last fifth - median of its first fifth| of probes,
    in decades on a log scale. 0 with fewer than two finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if len(v) < 2:
        return 0.0
    if log:
        v = np.log10(v)
    k = max(1, len(v) // 5)
    return float(abs(np.median(v[-k:]) - np.median(v[:k])))


def most_changed(runs: list[tuple[int, RunView]], metric: str, k: int, log: bool) -> list[str]:
    """The ``k`` layers with the largest :func:`change_score` in any run, in model order."""
    scores: dict[str, float] = {}
    order: list[str] = []
    for _, run in runs:
        md = run.metric(metric)
        for key in md.layer_keys() or md.keys():
            c = md.curve(key)
            if c is None:
                continue
            if key not in scores:
                order.append(key)
            scores[key] = max(scores.get(key, 0.0), change_score(c[1], log))
    top = set(sorted(order, key=lambda key: -scores[key])[:k])
    return [key for key in order if key in top]


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Centred running median over ``window`` probes (odd), ignoring NaN; the ends use what they have."""
    from numpy.lib.stride_tricks import sliding_window_view

    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isfinite(v), v, np.nan)
    half = window // 2
    padded = np.concatenate([np.full(half, np.nan), v, np.full(half, np.nan)])
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(sliding_window_view(padded, window), axis=1)


def smoothing_window(n: int) -> int:
    """Odd window of about 4 % of the probes (1: no smoothing) for series longer than SMOOTH_ABOVE."""
    if n <= SMOOTH_ABOVE or n > 50_000:
        return 1
    return max(3, (n // 25) | 1)


def layer_block(view: ReportView, sink: ChartSink, metric: str, label: str, *, log: bool = False,
                how: str = "mean", cmap: str = "viridis", vlim: tuple[float, float] | None = None) -> str:
    """Lines per layer (few layers) or the most changed layers plus the folded full matrix."""
    runs = runs_with(view, metric)
    if not runs:
        return ""
    n_layers = max(len(layers_of(run, metric)) for _, run in runs)
    values = [run.metric(metric).by_key[k].values for _, run in runs for k in layers_of(run, metric)]
    scale, linthresh = signed_scale(values) if log else ("linear", None)
    many = n_layers > MAX_LAYER_LINES
    if many:
        chosen = most_changed(runs, metric, MOST_CHANGED, scale != "linear")
    else:
        chosen = []
        for _, run in runs:
            chosen += [k for k in layers_of(run, metric) if k not in chosen]
    colors = {k: LAYER_PALETTE[j % len(LAYER_PALETTE)] for j, k in enumerate(chosen)}
    charts = []
    for i, run in runs:
        md = run.metric(metric)
        lines = []
        window = 1
        for key in chosen + (["all"] if md.layer_keys() and "all" in md.by_key else []):
            c = md.curve(key)
            if c is None:
                continue
            steps, vals = c
            w = smoothing_window(len(steps)) if many else 1
            if w > 1:
                vals, window = running_median(vals, w), w
            if key == "all":
                lines.append(Line("whole model", steps, vals, "#000000", width=2.2, run=i, keep=alert_steps(run)))
            else:
                lines.append(Line(key, steps, vals, colors[key], run=i, keep=alert_steps(run)))
        title = metric if len(view.runs) == 1 else f"{metric}: {run.name}"
        if window > 1:
            title += f" (running median of {window} probes)"
        charts.append(Chart(title, label, lines, marks=alert_marks(i, run, ("explosion_warning", "loss_explosion")),
                            scale=scale, group=f"layers-{metric}", height=200, cols=min(len(runs), 3)))
        charts[-1].linthresh = linthresh
    yr = shared_range([ln.y for c in charts for ln in c.lines], scale)
    if vlim is not None:
        yr = (vlim[0] - 0.03 * (vlim[1] - vlim[0]), vlim[1] + 0.03 * (vlim[1] - vlim[0]))
    for c in charts:
        c.yrange = yr if len(charts) > 1 or vlim is not None else None
    out = ""
    if many:
        out += (f'<p class="chart-note">The {len(chosen)} of {n_layers} layers whose {esc(metric)} changed most '
                "(median of the first fifth of probes against the last fifth, largest over the runs); every "
                "layer is in the heatmap below.</p>\n")
    out += grid([sink.chart(c) for c in charts], min(len(charts), 3))
    if many:
        fig = heatmap_figure(view, sink, metric, label, runs, how=how, cmap=cmap, scale=scale, vlim=vlim,
                             linthresh=linthresh)
        out += folded(f"All {n_layers} layers of {metric}: layer × step heatmap", fig)
    return out


# --- the full matrix -----------------------------------------------------------------------------------


def _block(name: str) -> tuple[str | None, str]:
    """Split a layer name at its first numeric part: ``blocks.3.attn.q_proj`` -> ("blocks.3", "attn.q_proj")."""
    parts = name.split(".")
    for j, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: j + 1]), ".".join(parts[j + 1:])
    return None, name


def row_labels(labels: list[str], max_labels: int) -> tuple[list[int], list[str], list[tuple[int, str]]]:
    """Tick rows, their texts, and the block groups ``(first row, block name)``.

    Above :data:`GROUP_LABELS_ABOVE` rows the labels are grouped by block when the names have blocks:
    each row shows the rest of its name and each block is named once. Labels are thinned to
    ``max_labels``, keeping the first row of every block.
    """
    n = len(labels)
    split = [_block(x) for x in labels]
    names = [g for g, _ in split if g is not None]
    distinct = list(dict.fromkeys(names))
    grouped = n > GROUP_LABELS_ABOVE and 2 <= len(distinct) <= n / 2
    texts = [rest for _, rest in split] if grouped else list(labels)
    starts: list[tuple[int, str]] = []
    if grouped:
        prev = object()
        for r, (g, _) in enumerate(split):
            if g != prev and r > 0 or (r == 0 and g is not None):
                # a block's first row; "" marks the end of the blocks (a separator, no name)
                starts.append((r, g or ""))
            prev = g
    stride = max(1, math.ceil(n / max(max_labels, 1)))
    first_rows = {r for r, name in starts if name}
    ticks = [r for r in range(n) if r % stride == 0 or (stride > 1 and r in first_rows and len(starts) <= max_labels)]
    return ticks, [texts[t] for t in ticks], starts


def heatmap_figure(view: ReportView, sink: ChartSink, metric: str, label: str, runs: list[tuple[int, RunView]],
                   *, how: str, cmap: str, scale: str, vlim: tuple[float, float] | None,
                   linthresh: float | None = None) -> str:
    """A layer x step heatmap per run, side by side, on one colour scale (one colour bar below)."""
    import matplotlib

    mats = []
    for i, run in runs:
        layers = layers_of(run, metric)
        mat, edges = layer_matrix(run, metric, layers, how)
        mats.append((i, run, layers, mat, edges))
    fin = np.concatenate([m[np.isfinite(m)] for *_, m, _e in mats])
    kind = "linear"
    if vlim is not None:
        lo, hi = vlim
    elif not len(fin):
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(fin.min()), float(fin.max())
        kind = scale if scale in ("log", "asinh") and (lo > 0 or scale == "asinh") else "linear"
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    # the colour scale is the chart scale: one mapping for every run of the metric
    to_pixels = Scale(lo, hi, 0.0, 1.0, kind, linthresh or 1.0)

    def norm(v: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return to_pixels(np.asarray(v, dtype=float))
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    rows = max(len(layers) for _, _, layers, _, _ in mats)
    row_h = 12.0 if rows <= 40 else max(4.0, min(12.0, 480.0 / rows))
    max_labels = max(4, int(rows * row_h / 10.5))
    same = all(m[2] == mats[0][2] for m in mats)
    cols = min(len(mats), 3)
    width = {1: 1180, 2: 600, 3: 400}[cols]
    # Runs with the same layers share the first panel's row labels; the panels' widths then differ by
    # the labels so that every panel's plot area (its step axis) is equally wide.
    aligned = same and 1 < len(mats) <= 3
    left0 = _label_width(*row_labels(mats[0][2], max_labels), row_h, width)
    plot_w = (1180 - left0 - 6 * (cols - 1) - HEAT_RIGHT * cols) / cols
    widths = []
    cells = []
    for col, (_i, run, layers, mat, edges) in enumerate(mats):
        show = col % cols == 0 or not same
        ticks, texts, starts = row_labels(layers, max_labels)
        labels = list(zip(ticks, texts)) if show else []
        left = _label_width(ticks, texts, starts, row_h, width) if show else 6
        if aligned:
            width = int(round(left + plot_w + HEAT_RIGHT))
        widths.append(width)
        rgba = cm(np.ma.masked_invalid(norm(mat)), bytes=True)
        marks = [{"x": e.step, "color": ALERT_STYLE[e.kind]["color"],
                  "dash": (6, 4) if ALERT_STYLE[e.kind]["ls"] != "-" else None}
                 for e in run.events if e.kind in ("explosion_warning", "loss_explosion")][:40]
        svg = heatmap_svg(rgba, np.asarray(edges, dtype=float), width=width, row_h=row_h, left=left, labels=labels,
                          groups=starts if show else [(r, "") for r, _ in starts], marks=marks,
                          alt=f"{metric} per layer over steps: {run.name}")
        title = run.name if len(view.runs) > 1 else metric
        cells.append(f'<div><div class="stitle">{esc(title)}</div>{svg}</div>')
    kinds = sorted({e.kind for _, run, *_ in mats for e in run.events
                    if e.kind in ("explosion_warning", "loss_explosion")})
    key = legend_html([(ALERT_STYLE[k]["label"], ALERT_STYLE[k]["color"], ALERT_STYLE[k]["ls"] != "-", False)
                       for k in kinds])
    bar = colorbar_svg(cm, norm, lo, hi, kind=kind, c=linthresh or 1.0,
                       label=label + {"log": " (log scale)", "asinh": " (symmetric log scale)"}.get(kind, ""))
    if aligned:
        fractions = " ".join(f"{w}fr" for w in widths)
        body = f'<div class="grid heatgrid" style="grid-template-columns:{fractions}">{"".join(cells)}</div>'
    else:
        body = grid(cells, cols)
    return f'<div class="heat">{body}<div class="heat-foot">{bar}{key}</div></div>\n'


def _label_width(ticks: list[int], texts: list[str], starts: list[tuple[int, str]], row_h: float,
                 width: int) -> int:
    """Room for the row labels (and block names) left of a heatmap, at most 45 % of its width."""
    fs = label_font(row_h)
    label_w = max((len(t) for t in texts), default=0) * fs * 0.62 + 8
    group_w = max((len(g) for _, g in starts), default=0) * fs * 0.66 + 8 if any(g for _, g in starts) else 0
    return int(min(width * 0.45, label_w + group_w + 4))
