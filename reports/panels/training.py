"""Panels on the training loop itself: loss and learning rate, norms, and the cost of monitoring."""

from __future__ import annotations

import numpy as np

from ..charts import ChartSink, Rule
from ..figures import run_color
from ..views import ReportView, RunView
from .base import STORY_ALERTS, Panel, esc, fmt, folded, grid, overlay_chart, runs_with, table_html
from .layerviews import layer_block

# The loss is read on ratios (the explosion rule is "twice the running minimum"), so its axis turns
# logarithmic from one decade on, where other metrics wait for two.
LOSS_LOG_DECADES = 1.0


def loss_chart(view: ReportView, *, group: str, height: int = 210, alerts: tuple[str, ...] = STORY_ALERTS):
    """The loss of every run, with alert marks; log axis when it spans a decade."""
    return overlay_chart(view, "loss", "loss", title="loss", decades=LOSS_LOG_DECADES, alerts=alerts,
                         group=group, height=height)


def _draw_loss(view: ReportView, sink: ChartSink) -> str:
    charts = [loss_chart(view, group="loss", alerts=STORY_ALERTS + ("rank_collapse",))]
    if view.has("learning_rate"):
        charts.append(overlay_chart(view, "learning_rate", "learning rate", title="learning rate", group="loss"))
    return grid([sink.chart(c) for c in charts], 2)


LOSS = Panel(
    id="loss",
    title="Loss and learning rate",
    metrics=("loss", "learning_rate"),
    about=("The training loss the optimizer differentiates (mean over the batch) and the learning rate read "
           "from the optimizer at each step. Vertical lines mark alerts: explosion warnings (orange, dashed), "
           "loss explosions (red), edge-of-stability crossings (purple, dotted); crosses along the bottom "
           "mark non-finite values. Long runs are drawn from each bucket's minimum and maximum, so spikes are "
           "never averaged away."),
    citation=("Goodfellow, Bengio and Courville, 2016, Deep Learning, chapter 8 (Optimization for Training "
              "Deep Models)."),
    draw=_draw_loss,
)


def _draw_norms(view: ReportView, sink: ChartSink) -> str:
    specs = [("grad_norm", "gradient norm"), ("weight_norm", "weight norm"), ("update_ratio", "|update| / |weights|")]
    specs = [(m, lab) for m, lab in specs if view.has(m)]
    # the whole model's norms, runs overlaid; the per-layer views folded under them
    overview = [sink.chart(overlay_chart(view, m, lab, title=f"{m} (whole model)", group="norms",
                                         alerts=("explosion_warning", "loss_explosion", "nonfinite")))
                for m, lab in specs]
    out = grid(overview, 2)
    for metric, label in specs:
        body = layer_block(view, sink, metric, label, log=True, how="max")
        out += folded(f"{metric} per layer", body)
    return out


NORMS = Panel(
    id="norms",
    title="Gradient and weight norms",
    metrics=("grad_norm", "weight_norm", "update_ratio"),
    about=("Euclidean norms of the gradient and of the weights, per parameter tensor and for the whole model "
           "(black), and the relative update size |delta theta| / |theta|. Gradient-norm spikes and steadily "
           "growing weight norms are the classical warning signs of instability; an update ratio far above "
           "about 1e-3 per step usually means the learning rate is too high for that layer. Per layer (folded): "
           "the layers that changed most, and a layer x step heatmap of each bin's maximum."),
    citation=("Pascanu, Mikolov and Bengio, 2013, On the Difficulty of Training Recurrent Neural Networks; "
              "Wortsman et al., 2023, Small-scale Proxies for Large-scale Transformer Training Instabilities."),
    draw=_draw_norms,
)


def _overhead_chart(view: ReportView, sink: ChartSink) -> str:
    """The amortised overhead of each run with a budget, and a rule at each budget."""
    if not view.has("monitor_overhead"):
        return ""
    budgets: dict[float, list[int]] = {}
    for i, run in runs_with(view, "monitor_overhead"):
        budget = _budget_of(run)
        if budget is not None:
            budgets.setdefault(budget, []).append(i)
    rules = []
    for budget, runs in budgets.items():
        if len(runs) > 1:  # one line for the runs that share a budget, not labels drawn over each other
            rules.append(Rule(budget, f"budget {budget:g}"))
        else:
            name = view.runs[runs[0]].name
            label = f"budget {budget:g}" + (f": {name}" if len(view.runs) > 1 else "")
            rules.append(Rule(budget, label, color=run_color(runs[0]), run=runs[0]))
    # Logarithmic from one decade on: a short run's first probes put it far above a budget of a few percent.
    chart = overlay_chart(view, "monitor_overhead", "monitor ÷ training time", decades=1.0,
                          title="amortised overhead (last 200 steps)", rules=rules, group="cost", cols=1)
    return sink.chart(chart) + _over_budget_note(view) + _stride_note(view)


def _budget_of(run: RunView) -> float | None:
    """The run's overhead budget (meta ``budget``), or None for fixed schedules."""
    budget = run.meta.get("budget")
    return float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None


def _seconds_by_diagnostic(run: RunView) -> dict[str, float]:
    """The seconds each diagnostic added over the run (``monitor_seconds`` summed over its finite values)."""
    md = run.metric("monitor_seconds")
    out: dict[str, float] = {}
    for k in md.keys() if md is not None else ():
        c = md.curve(k)
        if c is not None:
            out[k] = float(c[1][np.isfinite(c[1])].sum())
    return out


def _over_budget_note(view: ReportView) -> str:
    """One note on the runs whose amortised overhead ended above their budget: by how much, their costliest
    diagnostics, and what the budget does not hold back."""
    lines = []
    for _, run in runs_with(view, "monitor_overhead"):
        budget = _budget_of(run)
        curve = run.curve("monitor_overhead")
        if budget is None or budget <= 0 or curve is None:
            continue
        finite = np.isfinite(curve[1])
        if not finite.any() or curve[1][finite][-1] <= budget:
            continue
        last_step, last = int(curve[0][finite][-1]), float(curve[1][finite][-1])
        costs = sorted(_seconds_by_diagnostic(run).items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{esc(k)} {fmt(round(v, 2))} s" for k, v in costs)
        who = f"{esc(run.name)}: " if len(view.runs) > 1 else ""
        lines.append(f"{who}{last:.1%} of the training time of the 200 steps up to step {last_step}, against a "
                     f"budget of {budget:.0%}" + (f" (costliest: {top})" if top else "") + ".")
    if not lines:
        return ""
    return ('<p class="chart-note">Ended above the budget: ' + " ".join(lines) + " The budget does not hold back "
            "the first two runs of each diagnostic (taken early so that every signal appears; in a short run "
            "they outweigh the training), a run that costs more than a 200-step window may spend (it waits "
            "until its average over a longer span fits instead), diagnostics given <code>every=</code>, nor the "
            "fixed cost of each <code>monitor.step</code> when training steps take about a millisecond.</p>\n")


def _stride_note(view: ReportView) -> str:
    """A sentence per run whose every-step diagnostics the budget thinned (``monitor_stride`` above 1)."""
    notes = []
    for _, run in runs_with(view, "monitor_stride"):
        curve = run.metric("monitor_stride").curve("all")
        if curve is None:
            continue
        values = curve[1][np.isfinite(curve[1])]
        if not values.size or values.max() <= 1:
            continue
        the = f"{esc(run.name)}: the" if len(view.runs) > 1 else "The"
        low, high = int(values.min()), int(values.max())
        spacing = f"{low} to {high}" if low < high else f"{high}"
        notes.append(f'<p class="chart-note">{the} every-step diagnostics (loss, norms, update ratio, ...) '
                     f"alone took more than half of the budget, so they ran every {spacing} steps "
                     "(monitor_stride); give them every= (e.g. <code>every={'grad_norm': 1}</code>) or a larger "
                     "budget to keep them at every step.</p>\n")
    return "".join(notes)


def _draw_cost(view: ReportView, sink: ChartSink) -> str:
    out = [_overhead_chart(view, sink)]
    rows_plot = runs_with(view, "monitor_seconds")
    if rows_plot:
        # total seconds per diagnostic and run: a table with a bar in each cell
        names: list[str] = []
        totals: dict[tuple[int, str], float] = {}
        for i, run in rows_plot:
            for k, v in _seconds_by_diagnostic(run).items():
                totals[(i, k)] = v
                if k not in names:
                    names.append(k)
        top = max(totals.values(), default=0.0) or 1.0
        names.sort(key=lambda n: -max(totals.get((i, n), 0.0) for i, _ in rows_plot))
        head = "".join(f'<th><span class="swatch" style="background:{run_color(i)}"></span>{esc(run.name)}</th>'
                       for i, run in rows_plot)
        body = []
        for n in names:
            cells = []
            for i, _run in rows_plot:
                v = totals.get((i, n))
                if v is None:
                    cells.append("<td></td>")
                    continue
                pct = 100.0 * v / top
                cells.append(f'<td class="bar"><i style="width:{pct:.1f}%;background:{run_color(i)}"></i>'
                             f"<span>{esc(fmt(round(v, 3)))} s</span></td>")
            body.append(f"<tr><td>{esc(n)}</td>{''.join(cells)}</tr>")
        out.append('<table class="cost"><caption>Seconds each diagnostic added, summed over the run (monitor_seconds)'
                   f"</caption><thead><tr><th>diagnostic</th>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
                   "</table>\n")
    for run in view.runs:
        if not run.status_summary:
            continue
        rows = []
        for s in run.status_summary:
            failed = ("failed", f"{s.failed} (first at step {s.first_failure_step}: "
                      f"{s.first_failure_reason or 'no reason given'})") if s.failed else "0"
            rows.append([s.diagnostic, s.calls, s.ok, s.not_converged, failed, fmt(s.seconds),
                         fmt(s.seconds / s.calls if s.calls else float("nan")),
                         "" if s.num_matvecs is None else s.num_matvecs])
        heading = "Estimator status" + (f": {run.name}" if len(view.runs) > 1 else "")
        failures = sum(s.failed for s in run.status_summary)
        note = f" ({failures} failed)" if failures else ""
        out.append(folded(heading + note, table_html(
            ["diagnostic", "calls", "ok", "not converged", "failed", "total s", "mean s", "matvecs"], rows),
            open_=bool(failures)))
    return "".join(out)


COST = Panel(
    id="cost",
    title="Cost of monitoring",
    metrics=("monitor_seconds", "monitor_overhead", "monitor_stride"),
    about=("The amortised overhead of monitoring (its seconds over the training seconds of the last 200 steps) "
           "against the run's overhead budget, when it has one (and how far apart the budget spaced the every-step "
           "diagnostics, when it had to); wall-clock seconds each diagnostic added to "
           "training, and how each estimator fared: ok, not "
           "converged (numbers kept but flagged) or failed (no numbers stored; the reason is given). "
           "Curvature estimates are counted in Hessian-vector products (matvecs), each costing about two "
           "gradient evaluations."),
    citation=("Pearlmutter, 1994, Fast Exact Multiplication by the Hessian; Yao et al., 2020, PyHessian: "
              "Neural Networks Through the Lens of the Hessian."),
    draw=_draw_cost,
    uses_status=True,
)
