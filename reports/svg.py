"""Static charts written directly as inline SVG: the fallback of every interactive chart, and the heatmaps.

Line charts and heatmaps are simple enough that writing their SVG by hand is about a hundred times
faster than rendering them through matplotlib, and a third of the size: a report with dozens of charts
builds in seconds. The output depends only on the data (no library version in it). Every text node and
attribute value is escaped. A heatmap's cells are one PNG at the matrix's own resolution, stretched
without smoothing; its axes and labels are SVG text.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np

FONT = 11  # px in the SVG's own units
TICK_FONT = 10


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt_tick(v: float) -> str:
    """Short tick label: 4 significant digits, exponent form far from 1."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        m, e = f"{v:.1e}".split("e")
        m = m.rstrip("0").rstrip(".")
        return f"{m}e{int(e)}"
    return f"{v:.4g}"


# --- scales ---------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round ticks (1, 2, 5 x 10^k steps) inside ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    out = []
    v = start
    while v <= hi + 1e-9 * step:
        out.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return out


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten inside ``[lo, hi]`` (with 2 and 5 multiples when fewer than three fit)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    powers = [10.0 ** k for k in range(a, b + 1) if lo <= 10.0 ** k <= hi]
    if len(powers) >= 3:
        stride = max(1, math.ceil(len(powers) / 7))
        return powers[::stride]
    out = [m * 10.0 ** k for k in range(a, b + 1) for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
    return out or [lo, hi]


class Scale:
    """Maps values to pixels on ``[p0, p1]``: linear, log10 or asinh (symmetric log)."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, kind: str = "linear", c: float = 1.0) -> None:
        self.kind, self.c = kind, c
        self.lo, self.hi = lo, hi
        self.t0, self.t1 = self.f(lo), self.f(hi)
        if self.t1 == self.t0:
            self.t1 = self.t0 + 1.0
        self.p0, self.p1 = p0, p1

    def f(self, v: Any) -> Any:
        if self.kind == "log":
            return np.log10(np.maximum(v, 1e-300))
        if self.kind == "asinh":
            return np.arcsinh(np.asarray(v, dtype=float) / self.c)
        return np.asarray(v, dtype=float)

    def __call__(self, v: Any) -> Any:
        return self.p0 + (self.f(v) - self.t0) / (self.t1 - self.t0) * (self.p1 - self.p0)

    def ticks(self) -> list[float]:
        if self.kind == "log":
            return log_ticks(self.lo, self.hi)
        if self.kind == "asinh":
            top = max(abs(self.lo), abs(self.hi))
            out = [0.0] if self.lo <= 0 <= self.hi else []
            k = math.ceil(math.log10(max(self.c, 1e-300)))
            while 10.0 ** k <= top * 1.0001:
                out += [s * 10.0 ** k for s in (-1, 1) if self.lo <= s * 10.0 ** k <= self.hi]
                k += 1
            out = sorted(out)
            stride = max(1, math.ceil(len(out) / 7))
            return out[::stride]
        return nice_ticks(self.lo, self.hi)


def value_range(values: list[np.ndarray], kind: str, include: list[float] = ()) -> tuple[float, float]:
    """Finite data range (positive only on a log scale) with a small margin, widened to ``include``."""
    vals = [np.asarray(v, dtype=float) for v in values]
    v = np.concatenate([x[np.isfinite(x)] for x in vals] + [np.asarray(include, dtype=float)]) if vals else \
        np.asarray(include, dtype=float)
    if kind == "log":
        v = v[v > 0]
    if not len(v):
        return (1.0, 10.0) if kind == "log" else (0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if kind == "log":
        return (lo / 1.2, hi * 1.2) if hi > lo else (lo / 2, hi * 2)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


# --- line charts ----------------------------------------------------------------------------------------


def _dash(d: Any) -> str:
    return f' stroke-dasharray="{",".join(str(x) for x in d)}"' if d else ""


def _polyline(xs: np.ndarray, ys: np.ndarray, attrs: str) -> str:
    """One ``<path>`` with a move at every gap (non-finite value)."""
    parts = []
    pen = False
    for x, y in zip(xs.tolist(), ys.tolist()):
        if not math.isfinite(y):
            pen = False
            continue
        parts.append(f"{'L' if pen else 'M'}{x:.1f} {y:.1f}")
        pen = True
    return f'<path d="{"".join(parts)}" fill="none"{attrs}/>' if parts else ""


def line_chart_svg(series: list[dict[str, Any]], *, width: int, height: int, scale: str = "linear",
                   linthresh: float | None = None, yrange: tuple[float, float] | None = None,
                   rules: list[dict[str, Any]] = (), marks: list[dict[str, Any]] = (),
                   bands: list[tuple[int, int, str]] = (), ylabel: str = "", alt: str = "", uid: str = "c") -> str:
    """An SVG line chart. ``series``: dicts with x, y (arrays), color, dash, width, points; ``rules``: y,
    label, color, dash; ``marks``: x, color, dash. Non-finite values are gaps, marked by crosses along
    the bottom. Cost O(points)."""
    left, right, top, bottom = 62, 16, 8, 32
    xs_all = [np.asarray(s["x"], dtype=float) for s in series if len(s["x"])]
    if not xs_all:
        return ""
    x0 = float(min(x.min() for x in xs_all))
    x1 = float(max(x.max() for x in xs_all))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    kind = scale if scale in ("log", "asinh") else "linear"
    if yrange is not None:
        lo, hi = yrange
    else:
        lo, hi = value_range([s["y"] for s in series], kind, [r["y"] for r in rules])
    sx = Scale(x0, x1, left, width - right)
    sy = Scale(lo, hi, height - bottom, top, kind, linthresh or 1.0)
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(alt)}" class="schart" '
           f'font-family="sans-serif" font-size="{TICK_FONT}">']
    # grid and ticks
    for t in sy.ticks():
        y = float(sy(t))
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e8e8e8"/>'
                   f'<text x="{left - 4}" y="{y + 3.5:.1f}" text-anchor="end" fill="#444">{esc(fmt_tick(t))}</text>')
    for t in nice_ticks(x0, x1, max(3, width // 110)):
        x = float(sx(t))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#f0f0f0"/>'
                   f'<text x="{x:.1f}" y="{height - bottom + 13}" text-anchor="middle" fill="#444">'
                   f"{esc(fmt_tick(t))}</text>")
    out.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
               'fill="none" stroke="#bbb"/>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" text-anchor="middle" fill="#444">step</text>')
    out.append(f'<text transform="translate(12 {(top + height - bottom) / 2:.0f}) rotate(-90)" text-anchor="middle" '
               f'fill="#444">{esc(ylabel)}</text>')
    clip = f"{uid}-clip"
    out.append(f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{width - left - right}" '
               f'height="{height - top - bottom}"/></clipPath><g clip-path="url(#{clip})">')
    pix = [(sx(np.asarray(s["x"], dtype=float)), sy(np.asarray(s["y"], dtype=float))) for s in series]
    for a, b, color in bands:
        (xa, ya), (xb, yb) = pix[a], pix[b]
        ok_a, ok_b = np.isfinite(ya), np.isfinite(yb)
        if ok_a.any() and ok_b.any():
            pts = [f"{x:.1f},{y:.1f}" for x, y in zip(xa[ok_a], ya[ok_a])]
            pts += [f"{x:.1f},{y:.1f}" for x, y in zip(xb[ok_b][::-1], yb[ok_b][::-1])]
            out.append(f'<polygon points="{" ".join(pts)}" fill="{esc(color)}" stroke="none"/>')
    for m in marks:
        x = float(sx(m["x"]))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="{esc(m["color"])}" '
                   f'stroke-opacity="0.75"{_dash(m.get("dash"))}/>')
    for s, (px, py) in zip(series, pix):
        color = esc(s["color"])
        if s.get("points"):
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="none" stroke="{color}"/>'
                    for x, y in zip(px, py) if math.isfinite(y)]
            continue
        out.append(_polyline(px, py, f' stroke="{color}" stroke-width="{s.get("width", 1.4):.2g}"'
                                     f'{_dash(s.get("dash"))} stroke-linejoin="round"'))
        if len(px) <= 60 and s.get("markers", True):
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{color}"/>' for x, y in zip(px, py)
                    if math.isfinite(y)]
        bad = ~np.isfinite(np.asarray(s["y"], dtype=float))
        yb = height - bottom - 5
        out += [f'<path d="M{x - 3:.1f} {yb - 3}l6 6m0 -6l-6 6" stroke="#000"/>' for x in px[bad]]
    for r in rules:
        y = float(sy(r["y"]))
        if not (top - 1 <= y <= height - bottom + 1):
            continue
        color = esc(r["color"])
        ty = y + 12 if y < top + 14 else y - 3
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
                   f'stroke-width="1.2"{_dash(r.get("dash"))}/>'
                   f'<text x="{width - right - 4}" y="{ty:.1f}" text-anchor="end" fill="{color}" font-size="{FONT}" '
                   f'stroke="#fff" stroke-width="3" paint-order="stroke">{esc(r["label"])}</text>')
    out.append("</g></svg>")
    return "".join(out)


def legend_html(entries: list[tuple[str, str, Any, bool]]) -> str:
    """HTML legend: (label, color, dash, points-only) per entry."""
    items = []
    for label, color, dash, points in entries:
        if points:
            sw = f'<i class="sw pt" style="border-color:{esc(color)}"></i>'
        else:
            style = "dashed" if dash else "solid"
            sw = f'<i class="sw" style="border-top:2px {style} {esc(color)}"></i>'
        items.append(f"<span>{sw}{esc(label)}</span>")
    return f'<div class="slegend">{"".join(items)}</div>' if items else ""


# --- heatmaps -------------------------------------------------------------------------------------------


def png_data_uri(rgba: np.ndarray) -> str:
    """A PNG data URI of an ``[h, w, 4]`` uint8 image (Pillow, which matplotlib depends on)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def label_font(row_h: float) -> float:
    """Font size of a heatmap's row labels for rows ``row_h`` high (thinned labels need no less than 7)."""
    return min(TICK_FONT, max(7.0, row_h * 0.95))


def heatmap_svg(rgba: np.ndarray, edges: np.ndarray, *, width: int, row_h: float, left: int,
                labels: list[tuple[int, str]], groups: list[tuple[int, str]], marks: list[dict[str, Any]],
                alt: str) -> str:
    """One layer x step heatmap: ``rgba`` [rows, cols, 4] drawn over the step range ``edges[0]..edges[-1]``
    (column j covers ``edges[j]..edges[j+1]``; unequal widths are resampled to a fine even grid)."""
    rows, cols = rgba.shape[:2]
    top, bottom, right = 6, 30, 14  # right: layerviews.HEAT_RIGHT
    plot_h = rows * row_h
    height = int(math.ceil(top + plot_h + bottom))
    x0, x1 = float(edges[0]), float(edges[-1])
    widths = np.diff(edges)
    if cols > 1 and not np.allclose(widths, widths[0], rtol=1e-6):
        # columns of unequal width: resample onto an even grid fine enough for the narrowest column
        n = int(min(2000, max(cols, math.ceil((x1 - x0) / max(widths.min(), 1e-12)))))
        centers = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
        idx = np.clip(np.searchsorted(edges, centers, side="right") - 1, 0, cols - 1)
        rgba = rgba[:, idx]
    sx = Scale(x0, x1, left, width - right)
    pw = width - left - right
    out = [f'<svg viewBox="0 0 {width} {height}" role="img" aria-label="{esc(alt)}" class="sheat" '
           f'font-family="sans-serif" font-size="{TICK_FONT}">',
           f'<image x="{left}" y="{top}" width="{pw}" height="{plot_h:.1f}" preserveAspectRatio="none" '
           f'style="image-rendering:pixelated" href="{png_data_uri(rgba)}"/>']
    fs = label_font(row_h)
    for r, text in labels:
        y = top + (r + 0.5) * row_h
        out.append(f'<text x="{left - 4}" y="{y + fs * 0.35:.1f}" text-anchor="end" font-size="{fs:.1f}" '
                   f'fill="#333">{esc(text)}</text>')
    for r, name in groups:
        y = top + r * row_h
        if r > 0:
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#fff" '
                       'stroke-width="1.5"/>')
        if name:
            out.append(f'<text x="2" y="{y + fs:.1f}" font-weight="bold" font-size="{fs:.1f}" fill="#111">'
                       f"{esc(name)}</text>")
    for m in marks:
        x = float(sx(m["x"]))
        if left <= x <= width - right:
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h:.1f}" stroke="{esc(m["color"])}" '
                       f'stroke-width="1.5"{_dash(m.get("dash"))}/>')
    yb = top + plot_h
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{plot_h:.1f}" fill="none" stroke="#999"/>')
    for t in nice_ticks(x0, x1, max(3, pw // 90)):
        x = float(sx(t))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{yb:.1f}" y2="{yb + 4:.1f}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{yb + 15:.1f}" text-anchor="middle" fill="#444">{esc(fmt_tick(t))}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 3}" text-anchor="middle" fill="#444">step</text></svg>')
    return "".join(out)


def colorbar_svg(cmap: Any, norm: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, *, kind: str,
                 label: str, c: float = 1.0, width: int = 420) -> str:
    """A horizontal colour bar with ticks: the one scale shared by the heatmaps above it. ``norm`` maps
    values to [0, 1] on the ``kind`` scale ("linear", "log" or "asinh" with linear range ``c``)."""
    left, right, bar_h = 12, 14, 10
    sc = Scale(lo, hi, left, width - right, kind, c)
    # the bar's colours at evenly spaced positions along its own scale
    t = np.linspace(sc.t0, sc.t1, 256)
    vals = 10.0 ** t if kind == "log" else (np.sinh(t) * c if kind == "asinh" else t)
    rgba = cmap(norm(vals), bytes=True).reshape(1, 256, 4)
    out = [f'<svg viewBox="0 0 {width} 42" class="scbar" role="img" aria-label="{esc("colour scale: " + label)}" '
           f'font-family="sans-serif" font-size="{TICK_FONT}">',
           f'<image x="{left}" y="2" width="{width - left - right}" height="{bar_h}" preserveAspectRatio="none" '
           f'href="{png_data_uri(rgba)}"/>']
    for v in sc.ticks():
        x = float(sc(v))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{2 + bar_h}" y2="{6 + bar_h}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{17 + bar_h}" text-anchor="middle" fill="#444">{esc(fmt_tick(v))}</text>')
    out.append(f'<text x="{width / 2:.0f}" y="40" text-anchor="middle" fill="#444">{esc(label)}</text></svg>')
    return "".join(out)
