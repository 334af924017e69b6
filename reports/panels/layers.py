"""Per-layer panels: spectral alignment, effective rank and GSNR."""

from __future__ import annotations

import numpy as np

from ..charts import Chart, ChartSink, Rule
from ..figures import FigureSink, heatmap, mpl_text
from ..summary import explosion_score_level
from ..views import ReportView, RunView
from .base import Panel, folded, grid, overlay_chart, runs_with, scalar_rows
from .layerviews import layer_block

MAX_DISTRIBUTION_STEPS = 4


def explosion_score_chart(view: ReportView, *, group: str, height: int = 210) -> Chart:
    """The detector's score with each run's warning level (below it no warning can fire)."""
    methods = {str((r.meta.get("diagnostics") or {}).get("explosion_detector", {}).get("method", "spectral_alignment"))
               for _, r in runs_with(view, "explosion_score")}
    bounded = methods == {"spectral_alignment"}
    title = ("explosion score (1 = every watched layer past its threshold)" if bounded
             else "explosion score (a warning fires above the threshold)")
    chart = overlay_chart(view, "explosion_score", "score", title=title, scale="linear",
                          alerts=("explosion_warning", "loss_explosion"), group=group, height=height)
    levels = [(i, run, explosion_score_level(run)) for i, run in runs_with(view, "explosion_score")]
    levels = [(i, run, lv) for i, run, lv in levels if lv is not None]
    if len({lv for _, _, lv in levels}) == 1:
        # every run has the same level: one line, no run names
        chart.rules.append(Rule(levels[0][2][0], levels[0][2][1], color="#b26a00"))
    else:
        for i, run, (level, label) in levels:
            chart.rules.append(Rule(level, f"{label}: {run.name}", color=chart_color(i), run=i))
    if bounded:
        chart.yrange = (-0.02, 1.02)
    return chart


def chart_color(i: int) -> str:
    from ..figures import run_color

    return run_color(i)


def _chosen_steps(run: RunView, steps: np.ndarray) -> list[int]:
    """Steps at which to show the alignment distribution: first, around the first warning, last."""
    if not len(steps):
        return []
    picks = [int(steps[0])]
    warn = run.events_of("explosion_warning", "loss_explosion")
    if warn:
        w = warn[0].step
        p = int(np.searchsorted(steps, w, side="right")) - 1
        if p >= 0:
            picks.append(int(steps[p]))
        # and the last probe before the warning's baseline started to move: 2 probes earlier
        if p - 2 >= 0:
            picks.append(int(steps[p - 2]))
    else:
        picks.append(int(steps[len(steps) // 2]))
    picks.append(int(steps[-1]))
    return sorted(set(picks))[:MAX_DISTRIBUTION_STEPS]


def _histogram_at(run: RunView, layers: list[str], step: int) -> np.ndarray:
    """Matrix [layers, bins] of the alignment histogram at one step (NaN where absent)."""
    md = run.metric("sa_histogram")
    rows = []
    nb = 20
    for k in layers:
        ks = md.by_key.get(k)
        row = np.full(nb, np.nan)
        if ks is not None:
            sel = ks.steps == step
            for i, v in zip(ks.index[sel], ks.values[sel]):
                if 0 <= i < nb:
                    row[i] = v
        rows.append(row)
    return np.vstack(rows) if rows else np.zeros((0, nb))


def _distributions(view: ReportView, sink: FigureSink) -> str:
    out = []
    for _i, run in runs_with(view, "sa_histogram"):
        md = run.metric("sa_histogram")
        layers = md.layer_keys() or md.keys()
        steps = np.unique(np.concatenate([md.by_key[k].steps for k in layers]))
        picks = _chosen_steps(run, steps)
        fig, axes = sink.new(1, len(picks), height=max(2.2, 0.12 * len(layers) + 1.0), width=9.4, sharex=False)
        for j, (ax, s) in enumerate(zip(axes[0, :], picks)):
            mat = _histogram_at(run, layers, s)
            heatmap(ax, mat, np.linspace(-1, 1, 21), layers if j == 0 else [""] * len(layers), cmap="Blues",
                    vmin=0.0, vmax=None, cbar_label="fraction of tokens" if j == len(picks) - 1 else "",
                    fig=fig if j == len(picks) - 1 else None)
            ax.axvline(0.0, color="black", lw=0.6)
            ax.set_title(f"step {s}", loc="left")
            ax.set_xlabel("alignment a")
        fig.suptitle(mpl_text("distribution of the alignment a = <x, v1> / |x| per layer"
                              + (f": {run.name}" if len(view.runs) > 1 else ""), 100), fontsize=9, x=0.02,
                     ha="left")
        out.append(sink.render(fig, "spectral-alignment distributions at chosen steps"))
    return "".join(out)


def _draw_sa(view: ReportView, sink: ChartSink) -> str:
    out = []
    if view.has("explosion_score"):
        chart = explosion_score_chart(view, group="sa", height=200)
        chart.cols = 1
        out.append(grid([sink.chart(chart)], 1))
    if view.has("sa_sign_diversity"):
        out.append(layer_block(view, sink, "sa_sign_diversity", "sign diversity", how="min", cmap="magma",
                               vlim=(0.0, 1.0)))
    out.append(folded("Distributions of the alignment at chosen steps", _distributions(view, sink)))
    extra = [m for m in ("sa_positive_fraction", "sa_mean", "sa_mean_abs", "sa_sigma1") if view.has(m)]
    for metric in extra:
        out.append(folded(f"{metric} per layer", layer_block(view, sink, metric, metric,
                                                              log=metric == "sa_sigma1")))
    return "".join(out)


SPECTRAL_ALIGNMENT = Panel(
    id="spectral-alignment",
    title="Spectral alignment per layer",
    metrics=("sa_sign_diversity", "sa_histogram", "sa_positive_fraction", "sa_mean", "sa_quantile",
             "sa_mean_abs", "sa_sigma1", "explosion_score"),
    about=("For each linear layer, the alignment a = <x, v1> / |x| of its inputs with the top right singular "
           "vector of its weight. Sign diversity 1 - |2 p+ - 1| is 1 when inputs fall on both sides of v1 and 0 "
           "when they are all on one side; for uncentred inputs it mostly tracks where the mean input lies "
           "along v1. Some healthy layers (the LM head, early MLP layers) are one-sided from the start, so "
           "read changes, not levels. The explosion score is the default detector's: the mean sign diversity "
           "over layers, as a falling z-score against the run's own history; a warning fires above the dashed "
           "threshold. On the loss-explosion benchmark it ranks the steps before an explosion no better than "
           "the learning rate and rarely warns in time (docs/explosions.md)."),
    citation=("Qiu, Wu, Tan, Wang and Yao, 2025, arXiv 2510.04202 (spectral alignment as an early warning of "
              "loss explosion); definitions in docs/metrics.md."),
    draw=_draw_sa,
)


RANK_SPECS = [
    ("activation_effective_rank", "activation erank"),
    ("weight_effective_rank", "weight erank"),
    ("grad_effective_rank", "gradient erank"),
    ("activation_stable_rank", "activation stable rank"),
    ("weight_stable_rank", "weight stable rank"),
    ("grad_stable_rank", "gradient stable rank"),
    ("activation_alpha_req", "alpha-ReQ"),
]


def _draw_rank(view: ReportView, sink: ChartSink) -> str:
    present = [(m, lab) for m, lab in RANK_SPECS if view.has(m)]
    if not present:
        return ""
    # the first recorded rank (the activations' when present) is shown, the others folded
    (first, first_label), rest = present[0], present[1:]
    out = layer_block(view, sink, first, first_label, how="min")
    for metric, label in rest:
        out += folded(f"{metric} per layer", layer_block(view, sink, metric, label, how="min"))
    return out


EFFECTIVE_RANK = Panel(
    id="effective-rank",
    title="Effective rank per layer",
    metrics=("activation_effective_rank", "weight_effective_rank", "grad_effective_rank",
             "activation_stable_rank", "weight_stable_rank", "grad_stable_rank", "activation_alpha_req"),
    about=("Effective rank exp(-sum p_k log p_k), p_k = sigma_k / sum sigma, over the singular values of a "
           "layer's activations, weights and gradient matrix, with the stable rank |W|_F^2 / |W|_2^2 and the "
           "alpha-ReQ decay exponent. A falling activation rank means the representation is collapsing onto "
           "few directions; gradient ranks are naturally low. The other rank metrics are folded under the "
           "first; in the heatmaps each bin shows its minimum."),
    citation=("Roy and Vetterli, 2007, The Effective Rank: a Measure of Effective Dimensionality; Garrido et al., "
              "2023, RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised Representations "
              "by Their Rank; Agrawal et al., 2022, alpha-ReQ: Assessing Representation Quality by Measuring "
              "Eigenspectrum Decay."),
    draw=_draw_rank,
)


def _draw_gsnr(view: ReportView, sink: ChartSink) -> str:
    out = ""
    if view.has("gsnr_mean"):
        out += layer_block(view, sink, "gsnr_mean", "GSNR (mean)", log=True)
    if view.has("gsnr_median"):
        out += folded("gsnr_median per layer", layer_block(view, sink, "gsnr_median", "GSNR (median)", log=True))
    out += scalar_rows(view, sink, [("grad_noise_scale", "B_simple"),
                                    ("gsnr_microbatch_mean", "micro-batch GSNR"),
                                    ("gsnr_microbatch_median", "micro-batch GSNR")],
                       height=1.9, group="gsnr")
    return out


GSNR = Panel(
    id="gsnr",
    title="Gradient signal-to-noise ratio per layer",
    metrics=("gsnr_mean", "gsnr_median", "grad_noise_scale", "gsnr_microbatch_mean", "gsnr_microbatch_median"),
    about=("GSNR per parameter is mean_i(g_i)^2 / var_i(g_i) over per-sample gradients, shown bias-corrected "
           "as (m^2 - s^2/N) / s^2 so that pure noise reads about 0 and can read below it (the uncorrected ratio is "
           "gsnr_raw_*); aggregated per layer by "
           "the mean or the median over its parameters (black: the whole model). Low GSNR means the gradient is "
           "mostly noise, and parameters with higher GSNR generalise better. The micro-batch variant estimates "
           "about (micro-batch size) x the per-sample GSNR and is shown separately; B_simple = tr(Sigma) / |g|^2 "
           "is the batch size beyond which larger batches stop paying off."),
    citation=("Liu et al., 2020, Understanding Why Neural Networks Generalize Well Through GSNR of Parameters; "
              "McCandlish et al., 2018, An Empirical Model of Large-Batch Training."),
    draw=_draw_gsnr,
)
