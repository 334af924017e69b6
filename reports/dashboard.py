"""The report's first screen: one card per run, then the key signals overlaid across runs.

A card says how the run ended (stable, spike, or explosion at step s, by :mod:`diagnostics.explosion`'s
rule), the first explosion warning and its lead, the first edge-of-stability crossing, the final loss and
what the monitoring cost. The key charts are the recorded ones among: loss, learning rate, sharpness
ratio, explosion score, top Hessian eigenvalues, effective rank and GSNR; they share one step axis
(zooming one zooms all).
"""

from __future__ import annotations

import numpy as np

from .charts import ChartSink
from .figures import run_color
from .panels.base import esc, grid, overlay_chart, size_text
from .panels.curvature import eigen_chart, sharpness_ratio_chart
from .panels.layers import explosion_score_chart
from .panels.training import loss_chart
from .summary import crossings_announced, final_loss, monitoring_cost, run_outcome
from .views import ReportView, RunView

GROUP = "overview"
HEIGHT = 190


def _warning_text(run: RunView, boom: int | None) -> str:
    warnings = run.events_of("explosion_warning")
    if warnings:
        w = warnings[0]
        where = f" ({w.key})" if w.key and w.key != "all" else ""
        lead = ""
        if boom is not None:
            lead = (f", {boom - w.step} steps before the explosion" if w.step <= boom
                    else f", {w.step - boom} steps after the explosion")
        more = f"; {len(warnings)} warnings in all" if len(warnings) > 1 else ""
        return f"step {w.step}{where}{lead}{more}"
    if run.has("explosion_score"):
        return "none"
    if "explosion_detector" in (run.meta.get("diagnostics") or {}):
        return "none (the detector never had enough probes for its baseline)"
    return "not monitored (no explosion detector)"


def _latest_ratio(run: RunView) -> str:
    """"; latest ratio R at step S" from the last finite sharpness ratio, or ""."""
    for metric in ("sharpness_ratio", "adam_sharpness_ratio"):
        c = run.curve(metric)
        if c is None:
            continue
        s, v = c
        ok = np.isfinite(v)
        if ok.any():
            i = np.flatnonzero(ok)[-1]
            # "1,031" rather than "1e+03": a ratio past the threshold is read for its size.
            return f"; latest ratio {size_text(v[i])} at step {int(s[i])}"
    return ""


def _eos_text(run: RunView) -> str:
    ups = [e for e in run.events_of("edge_of_stability") if e.data.get("direction", "up") != "down"]
    if ups:
        # A crossing early in training (Adam before its second moments settle) reads differently from one
        # the run stays at: the latest ratio says which.
        more = f" ({len(ups)} crossings)" if len(ups) > 1 else ""
        return f"crossed at step {ups[0].step}{more}{_latest_ratio(run)}"
    if crossings_announced(run):
        latest = _latest_ratio(run)
        return f"not reached{latest}" if latest else "not measured"
    for metric in ("sharpness_ratio", "adam_sharpness_ratio"):
        c = run.curve(metric)
        if c is None:
            continue
        s, v = c
        with np.errstate(invalid="ignore"):
            hit = np.isfinite(v) & (v >= 1.0)
        if hit.any():
            return f"reached at step {int(s[np.argmax(hit)])}"
        fin = v[np.isfinite(v)]
        return f"not reached (largest ratio {fin.max():.2g})" if len(fin) else "no finite estimate"
    return "not measured"


def _cost_text(run: RunView) -> str:
    cost = monitoring_cost(run)
    if cost is None:
        return "not recorded"
    total, per_step, top = cost
    unit = "checkpoint" if "analysis_mode" in run.meta else "step"
    text = f"{seconds(total)} in all, {seconds(per_step)} a {unit}"
    return text + (f"; most in {top}" if top else "")


def seconds(x: float) -> str:
    """1.8 s, 9.3 ms, 250 µs."""
    if x >= 1.0:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def run_card(i: int, run: RunView) -> str:
    """One run's card (every string escaped)."""
    outcome = run_outcome(run)
    boom = outcome.step if outcome.kind == "explosion" else None
    final = final_loss(run)
    c = run.curve("loss")
    lowest = float(np.nanmin(np.where(np.isfinite(c[1]), c[1], np.nan))) if c is not None and np.isfinite(c[1]).any() else None
    rows = [
        ("Explosion warning", _warning_text(run, boom)),
        ("Edge of stability", _eos_text(run)),
        ("Final loss", f"{final[1]:.4g} at step {final[0]}" + (f" (lowest {lowest:.4g})" if lowest is not None else "")
         if final else "not recorded"),
        ("Monitoring cost", _cost_text(run)),
        ("Steps", f"{int(run.steps[0])} to {int(run.steps[-1])}, {len(run.steps)} recorded" if len(run.steps)
         else "none recorded"),
    ]
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows)
    return (f'<div class="card {esc(outcome.kind)}" style="border-top-color:{run_color(i)}">'
            f'<h3><span class="swatch" style="background:{run_color(i)}"></span>{esc(run.name)}</h3>'
            f'<p class="outcome {esc(outcome.kind)}">{esc(outcome.text.capitalize())}</p>'
            f"<dl>{items}</dl></div>")


def _with_link(chart_html: str, anchor: str, title: str) -> str:
    if not chart_html:
        return ""
    return f'<div class="cell">{chart_html}<a class="more" href="#{esc(anchor)}">{esc(title)} ↓</a></div>'


def key_charts(view: ReportView, sink: ChartSink) -> str:
    """The recorded key signals, runs overlaid, two a row."""
    cells = []
    if view.has("loss"):
        cells.append(_with_link(sink.chart(loss_chart(view, group=GROUP, height=HEIGHT)), "panel-loss",
                                "Loss and learning rate"))
    if view.has("learning_rate"):
        cells.append(_with_link(sink.chart(overlay_chart(view, "learning_rate", "learning rate",
                                                         title="learning rate", group=GROUP, height=HEIGHT)),
                                "panel-loss", "Loss and learning rate"))
    if view.has("sharpness_ratio", "adam_sharpness_ratio"):
        cells.append(_with_link(sink.chart(sharpness_ratio_chart(view, group=GROUP, height=HEIGHT)),
                                "panel-sharpness", "Sharpness"))
    if view.has("explosion_score"):
        cells.append(_with_link(sink.chart(explosion_score_chart(view, group=GROUP, height=HEIGHT)),
                                "panel-spectral-alignment", "Spectral alignment"))
    if view.has("hessian_eigenvalue"):
        cells.append(_with_link(sink.chart(eigen_chart(view, "hessian", group=GROUP, height=HEIGHT, bottom=False)),
                                "panel-eigenvalues", "Eigenvalues"))
    for metric, label in (("activation_effective_rank", "activation erank"), ("weight_effective_rank", "weight erank")):
        if view.has(metric):
            chart = overlay_chart(view, metric, label, title=f"{metric}, median over layers", aggregate="median",
                                  group=GROUP, height=HEIGHT)
            cells.append(_with_link(sink.chart(chart), "panel-effective-rank", "Effective rank per layer"))
            break
    if view.has("gsnr_mean"):
        whole = any("all" in r.metric("gsnr_mean").by_key for r in view.runs if r.has("gsnr_mean"))
        chart = overlay_chart(view, "gsnr_mean", "GSNR", title="GSNR (mean over parameters), whole model" if whole
                              else "GSNR, median over layers", aggregate=None if whole else "median",
                              group=GROUP, height=HEIGHT)
        cells.append(_with_link(sink.chart(chart), "panel-gsnr", "GSNR per layer"))
    return grid(cells, 2)


def dashboard_html(view: ReportView, sink: ChartSink) -> str:
    """The overview section: run cards, then the key charts."""
    if all(r.empty for r in view.runs):
        return ""
    cards = "".join(run_card(i, run) for i, run in enumerate(view.runs))
    return ('<section id="overview">\n<h2>Overview</h2>\n'
            f'<div class="cards">{cards}</div>\n{key_charts(view, sink)}</section>\n')
