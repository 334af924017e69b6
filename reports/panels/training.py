"""Panels on the training loop itself: loss and learning rate, norms, and the cost of monitoring."""

from __future__ import annotations

import numpy as np

from ..figures import FigureSink, mpl_text, run_color
from ..views import ReportView
from .base import Panel, esc, fmt, layer_rows, runs_with, scalar_rows, table_html


def _draw_loss(view: ReportView, sink: FigureSink) -> str:
    return scalar_rows(view, sink, [("loss", "loss"), ("learning_rate", "learning rate")], alerts=True)


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


def _draw_norms(view: ReportView, sink: FigureSink) -> str:
    return layer_rows(view, sink, [("grad_norm", "gradient norm"), ("weight_norm", "weight norm"),
                                   ("update_ratio", "|update| / |weights|")], log=True, how="max")


NORMS = Panel(
    id="norms",
    title="Gradient and weight norms",
    metrics=("grad_norm", "weight_norm", "update_ratio"),
    about=("Euclidean norms of the gradient and of the weights, per parameter tensor and for the whole model "
           "(black), and the relative update size |delta theta| / |theta|. Gradient-norm spikes and steadily "
           "growing weight norms are the classical warning signs of instability; an update ratio far above "
           "about 1e-3 per step usually means the learning rate is too high for that layer. With many layers "
           "the panel shows a layer x step heatmap of each bin's maximum."),
    citation=("Pascanu, Mikolov and Bengio, 2013, On the Difficulty of Training Recurrent Neural Networks; "
              "Wortsman et al., 2023, Small-scale Proxies for Large-scale Transformer Training Instabilities."),
    draw=_draw_norms,
)


def _draw_cost(view: ReportView, sink: FigureSink) -> str:
    out = []
    rows_plot = runs_with(view, "monitor_seconds")
    if rows_plot:
        # total seconds per diagnostic and run: a grouped horizontal bar chart
        names: list[str] = []
        totals: dict[tuple[int, str], float] = {}
        for i, run in rows_plot:
            md = run.metric("monitor_seconds")
            for k in md.keys():
                c = md.curve(k)
                if c is None:
                    continue
                v = c[1][np.isfinite(c[1])]
                totals[(i, k)] = float(v.sum())
                if k not in names:
                    names.append(k)
        fig, axes = sink.new(1, 1, height=max(1.6, 0.28 * len(names) * max(1, len(rows_plot)) + 0.8),
                             sharex=False)
        ax = axes[0, 0]
        h = 0.8 / max(1, len(rows_plot))
        for j, (i, run) in enumerate(rows_plot):
            ys = np.arange(len(names)) + j * h
            ax.barh(ys, [totals.get((i, n), 0.0) for n in names], height=h, color=run_color(i),
                    label=mpl_text(run.name) if len(view.runs) > 1 else None)
        ax.set_yticks(np.arange(len(names)) + h * (len(rows_plot) - 1) / 2)
        ax.set_yticklabels([mpl_text(n, 40) for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("total seconds spent by the monitor")
        ax.set_title("monitor_seconds per diagnostic (sum over steps)", loc="left")
        if len(view.runs) > 1:
            ax.legend(frameon=False, fontsize=7)
        out.append(sink.render(fig, "seconds spent per diagnostic"))
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
        out.append(f"<h3>{esc(heading)}</h3>\n" + table_html(
            ["diagnostic", "calls", "ok", "not converged", "failed", "total s", "mean s", "matvecs"], rows))
    return "".join(out)


COST = Panel(
    id="cost",
    title="Cost of monitoring",
    metrics=("monitor_seconds",),
    about=("Wall-clock seconds each diagnostic added to training, and how each estimator fared: ok, not "
           "converged (numbers kept but flagged) or failed (no numbers stored; the reason is given). "
           "Curvature estimates are counted in Hessian-vector products (matvecs), each costing about two "
           "gradient evaluations."),
    citation=("Pearlmutter, 1994, Fast Exact Multiplication by the Hessian; Yao et al., 2020, PyHessian: "
              "Neural Networks Through the Lens of the Hessian."),
    draw=_draw_cost,
    uses_status=True,
)
