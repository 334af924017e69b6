"""The early-warning signals panel: attention logits and entropy, output logits, Adam's state."""

from __future__ import annotations

from ..charts import Chart, ChartSink, Line, Rule
from ..figures import run_color
from ..views import ReportView
from .base import (
    Panel,
    alert_marks,
    alert_steps,
    choose_scale,
    folded,
    grid,
    overlay_chart,
    run_label,
    runs_with,
)
from .layerviews import layer_block

_ALERTS = ("explosion_warning", "loss_explosion", "nonfinite")
ATTENTION = (("attn_logit_max", "largest attention logit"), ("attn_entropy_min", "min entropy (nats)"),
             ("attn_entropy_mean", "mean entropy (nats)"))
LOGITS = (("output_logit_max", "largest output logit"), ("output_log_z_mean", "mean log Z"),
          ("output_log_z_max", "largest log Z"))
ADAM = (("adam_update_rms", "RMS of m̂ / (√v̂ + ε)"), ("adam_update_grad_cosine", "cos(update, gradient)"),
        ("adam_small_grad_fraction", "fraction with g² < 0.01 v̂"))
#: Index of the quantiles drawn from adam_sqrt_v_quantile: q 0.05, 0.5, 0.95.
_V_LOW, _V_MID, _V_HIGH = 1, 3, 5


def _sqrt_v_chart(view: ReportView) -> Chart:
    """The median of sqrt(v-hat) per run, with its 5-95% range as a band."""
    lines: list[Line] = []
    bands: list[tuple[int, int, str]] = []
    marks = []
    for i, run in runs_with(view, "adam_sqrt_v_quantile"):
        md = run.metric("adam_sqrt_v_quantile")
        curves = [md.curve("all", j) for j in (_V_LOW, _V_MID, _V_HIGH)]
        if any(c is None or not len(c[0]) for c in curves):
            continue
        color, label = run_color(i), run_label(view, run)
        start = len(lines)
        for (x, y), what, width in zip(curves, ("q 0.05", "median", "q 0.95"), (0.8, 1.6, 0.8)):
            lines.append(Line(f"{label} {what}".strip(), x, y, color, dash="solid" if what == "median" else "dot",
                              width=width, run=i, markers=what == "median", keep=alert_steps(run)))
        bands.append((start, start + 2, color))
        marks += alert_marks(i, run, _ALERTS)
    return Chart("sqrt(v̂): median and 5-95% range over coordinates", "sqrt(v̂)", lines, [], marks,
                 scale=choose_scale([ln.y for ln in lines]), bands=bands, group="signals-adam")


def _overview(view: ReportView, sink: ChartSink, specs: tuple[tuple[str, str], ...], group: str,
              rules: dict[str, Rule] | None = None) -> str:
    charts = []
    for metric, label in specs:
        if not view.has(metric):
            continue
        rule = (rules or {}).get(metric)
        charts.append(sink.chart(overlay_chart(view, metric, label, title=f"{metric} (whole model)", alerts=_ALERTS,
                                               group=group, rules=[rule] if rule else None)))
    return grid(charts, 2)


def _draw_signals(view: ReportView, sink: ChartSink) -> str:
    out = []
    if any(view.has(m) for m, _ in ATTENTION):
        out.append("<h3>Attention</h3>\n" + _overview(view, sink, ATTENTION, "signals-attn"))
        for metric, label in ATTENTION[:2]:
            if view.has(metric):
                out.append(folded(f"{metric} per attention module",
                                  layer_block(view, sink, metric, label, how="max" if "max" in metric else "min")))
    if any(view.has(m) for m, _ in LOGITS):
        out.append("<h3>Output logits</h3>\n" + _overview(view, sink, LOGITS, "signals-logits"))
    if any(view.has(m) for m, _ in ADAM) or view.has("adam_sqrt_v_quantile"):
        body = _overview(view, sink, ADAM, "signals-adam",
                         {"adam_update_rms": Rule(1.0, "sign-like update (RMS 1)")})
        if view.has("adam_sqrt_v_quantile"):
            body += grid([sink.chart(_sqrt_v_chart(view))], 2)
        out.append("<h3>Adam state</h3>\n" + body)
        for metric, label in ADAM[:1] + ADAM[2:]:
            if view.has(metric):
                out.append(folded(f"{metric} per parameter", layer_block(view, sink, metric, label, how="max")))
    return "".join(out)


SIGNALS = Panel(
    id="signals",
    title="Early-warning signals: attention, output logits, Adam state",
    metrics=tuple(m for m, _ in ATTENTION + LOGITS + ADAM) + ("adam_sqrt_v_quantile",),
    about=("Attention: the largest pre-softmax logit and the attention entropy per attention module (the lowest "
           "head's mean entropy, and the mean over heads), measured on a probe forward. Logits that keep "
           "growing and a head whose entropy falls towards 0 (attention on a single key) precede many "
           "transformer loss explosions. Output logits: the largest logit and log Z, the log-sum-exp over "
           "classes, per token; a log Z that drifts upwards is what the z-loss removes. Adam: the RMS of the "
           "normalised update m̂ / (√v̂ + ε) (1 for a sign-like update; spikes above 1 mean v̂ lags a sudden "
           "gradient), its cosine with the gradient, the share of coordinates whose gradient is far below its "
           "running RMS (stale second moments), and the spread of √v̂. Read changes against the run's own "
           "early values."),
    citation=("Zhai et al., 2023, Stabilizing Transformer Training by Preventing Attention Entropy Collapse; "
              "Dehghani et al., 2023, Scaling Vision Transformers to 22 Billion Parameters; Wortsman et al., "
              "2023, Small-scale Proxies for Large-scale Transformer Training Instabilities; Chowdhery et al., "
              "2022, PaLM; Molybog et al., 2023, A Theory on Adam Instability in Large-Scale Machine Learning."),
    draw=_draw_signals,
)
