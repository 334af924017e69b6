"""Panels on loss curvature: sharpness and the edge of stability, top eigenvalues, spectral density,
trace, and gradient-subspace alignment."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..charts import Chart, ChartSink, Line, Mark, Rule
from ..downsample import midpoint_edges
from ..figures import FigureSink, layer_colors, mpl_text, run_color
from ..summary import adam_settling_until, adam_threshold_label, sgd_threshold_label
from ..views import ReportView, RunView
from .base import (
    Panel,
    alert_marks,
    alert_steps,
    choose_scale,
    esc,
    fmt,
    folded,
    grid,
    run_label,
    runs_with,
    size_text,
    table_html,
)

# SLQ kernel: variance SIGMA2 * max(1, lambda_max - lambda_min), as in PyHessian's density.
SIGMA2 = 1e-5
DENSITY_BINS = 160
MAX_DENSITY_COLUMNS = 150
EDGE_RULE = "threshold: ratio 1 (edge of stability)"


# --- sharpness ---------------------------------------------------------------------------------------


def _threshold_curve(run: RunView) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The stored stability threshold and its formula; else 2/lr computed from ``learning_rate``, except for
    runs whose optimizer has a threshold of its own (Adam's, on the preconditioned sharpness)."""
    c = run.curve("stability_threshold")
    if c is not None:
        return c[0], c[1], sgd_threshold_label(run)
    c = run.curve("learning_rate")
    if c is not None and run.has("sharpness") and not run.has("adam_threshold"):
        with np.errstate(divide="ignore", invalid="ignore"):
            return c[0], np.where(c[1] > 0, 2.0 / c[1], np.nan), "2/lr (from learning_rate; momentum unknown)"
    return None


def _ratio_label(view: ReportView) -> str:
    """What the ratio divides by: the formula when every run used the same one."""
    labels = {sgd_threshold_label(r) for _, r in runs_with(view, "sharpness_ratio")}
    return labels.pop().split(",")[0] if len(labels) == 1 else "the run's threshold"


def _settled_adam_curve(run: RunView, metric: str, left_out: list[str],
                        name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's curve of an Adam metric without the steps at which Adam's preconditioner was still
    settling (no threshold applies there, and the ratio can be thousands); what was left out is added to
    ``left_out`` as "name: steps a-b, up to X"."""
    c = run.curve(metric)
    until = adam_settling_until(run)
    if c is None or until is None:
        return c
    early = c[0] <= until
    if early.any():
        x, y = c[0][early], c[1][early]
        steps = f"step {int(x[0])}" if len(x) == 1 else f"steps {int(x[0])}-{int(x[-1])}"
        top = np.nanmax(y) if np.isfinite(y).any() else float("nan")
        left_out.append(f"{name}: {steps}, up to {size_text(top)}")
    return c[0][~early], c[1][~early]


def _settling_note(left_out: list[str], what: str) -> str:
    if not left_out:
        return ""
    return (f"Not drawn: {what} at the steps where Adam's preconditioner was still settling "
            f"({'; '.join(left_out)}); its threshold does not apply there.")


def sharpness_ratio_chart(view: ReportView, *, group: str, height: int = 210) -> Chart:
    """Sharpness / threshold (and Adam's preconditioned ratio), with the edge of stability at 1. Adam's
    ratios from its settling steps are left out, and the chart's note says which."""
    lines = []
    marks: list[Mark] = []
    left_out: list[str] = []
    for i, run in runs_with(view, "sharpness_ratio", "adam_sharpness_ratio"):
        for metric, dash, what in (("sharpness_ratio", "solid", f"λmax ÷ ({sgd_threshold_label(run)})"),
                                   ("adam_sharpness_ratio", "dashdot",
                                    f"preconditioned λmax ÷ ({adam_threshold_label(run).split(',')[0]})")):
            c = (_settled_adam_curve(run, metric, left_out, run.name) if metric == "adam_sharpness_ratio"
                 else run.curve(metric))
            if c is not None:
                lines.append(Line(run_label(view, run, what), c[0], c[1], run_color(i), dash=dash, run=i,
                                  keep=alert_steps(run)))
        marks += alert_marks(i, run, ("edge_of_stability",))
    title = (f"sharpness ÷ {_ratio_label(view)}" if view.has("sharpness_ratio") else
             "preconditioned sharpness ÷ Adam's threshold")
    return Chart(title + " (1 = edge of stability)", "ratio", lines, [Rule(1.0, EDGE_RULE)], marks,
                 scale=choose_scale([ln.y for ln in lines]), group=group, height=height,
                 note=_settling_note(left_out, "the ratios"))


def _draw_sharpness(view: ReportView, sink: ChartSink) -> str:
    top = ("sharpness", "adam_sharpness", "stability_threshold", "adam_threshold")
    charts = []
    if view.has(*top):
        lines = []
        left_out: list[str] = []
        for i, run in runs_with(view, *top):
            keep = alert_steps(run)
            color = run_color(i)
            for metric, dash, what in (("sharpness", "solid", "sharpness λmax"),
                                       ("adam_sharpness", "dashdot", "preconditioned sharpness")):
                c = (_settled_adam_curve(run, metric, left_out, run.name) if metric == "adam_sharpness"
                     else run.curve(metric))
                if c is not None:
                    lines.append(Line(run_label(view, run, what), c[0], c[1], color, dash=dash, run=i, keep=keep))
            thr = _threshold_curve(run)
            if thr is not None:
                lines.append(Line(run_label(view, run, f"threshold {thr[2]}"), thr[0], thr[1], color, dash="dash",
                                  run=i, keep=keep, width=1.1))
            c = run.curve("adam_threshold")
            if c is not None:
                lines.append(Line(run_label(view, run, f"Adam threshold {adam_threshold_label(run)}"), c[0], c[1],
                                  color, dash="dot", run=i, keep=keep, width=1.1))
        positive = all((np.asarray(ln.y)[np.isfinite(ln.y)] > 0).all() for ln in lines)
        charts.append(Chart("sharpness against the stability threshold", "eigenvalue", lines,
                            scale="log" if positive else "linear", group="sharpness",
                            note=_settling_note(left_out, "the preconditioned sharpness")))
    if view.has("sharpness_ratio", "adam_sharpness_ratio"):
        charts.append(sharpness_ratio_chart(view, group="sharpness"))
    return grid([sink.chart(c) for c in charts], 2)


SHARPNESS = Panel(
    id="sharpness",
    title="Sharpness and the edge of stability",
    metrics=("sharpness", "stability_threshold", "sharpness_ratio", "adam_sharpness", "adam_threshold",
             "adam_sharpness_ratio"),
    about=("Sharpness is the largest eigenvalue of the training-loss Hessian. Gradient descent with step lr is "
           "stable on a quadratic only while sharpness < 2/lr, with heavy-ball momentum β while it is < "
           "2(1+β)/lr; full-batch training typically sharpens until it reaches that threshold and then hovers "
           "there (the edge of stability), so a ratio sharpness ÷ threshold near 1 is expected, not alarming. "
           "For Adam the preconditioned sharpness is compared with (2+2β₁)/((1−β₁)lr), 38/lr for β₁ = 0.9. "
           "The labels name the formula of the threshold each run recorded."),
    citation=("Cohen et al., 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of "
              "Stability; Cohen et al., 2022, Adaptive Gradient Methods at the Edge of Stability."),
    draw=_draw_sharpness,
)


# --- top-k eigenvalues and the bulk/outlier gap ------------------------------------------------------


def eigen_gap(row: np.ndarray) -> tuple[int, float]:
    """Return (number of outliers m, gap ratio lambda_m / lambda_{m+1}) of one step's top eigenvalues.

    The gap is the largest ratio between consecutive positive eigenvalues in descending order; (0, NaN)
    when fewer than two positive finite eigenvalues exist.
    """
    v = np.sort(row[np.isfinite(row) & (row > 0)])[::-1]
    if len(v) < 2:
        return 0, float("nan")
    r = v[:-1] / v[1:]
    j = int(np.argmax(r))
    return j + 1, float(r[j])


def _failed_curvature_steps(run: RunView, prefix: str) -> dict[int, str]:
    out: dict[int, str] = {}
    if run.status.empty:
        return out
    for diag in run.status["diagnostic"].astype(str).unique():
        d = diag.lower()
        # a diagnostic names its operator; one naming neither (e.g. "lanczos") is taken as the Hessian's
        generic = "hessian" not in d and "ggn" not in d and any(w in d for w in ("eigen", "lanczos", "sharp"))
        if (prefix in d and ("eigen" in d or "lanczos" in d or "topk" in d)) or (prefix == "hessian" and generic):
            out.update(run.failed_steps(diag))
    return out


def _not_converged(run: RunView, prefix: str, steps: np.ndarray, idx: np.ndarray,
                   mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of the eigenvalue estimates flagged as not converged."""
    conv = run.metric(f"{prefix}_converged")
    if conv is None or conv.curve("all") is None:
        return np.zeros(0), np.zeros(0)
    cs, cidx, cmat = conv.by_key["all"].table()
    bad_s, bad_v = [], []
    pos = np.minimum(np.searchsorted(cs, steps), len(cs) - 1)
    for j, ix in enumerate(idx):
        if ix in cidx:
            cj = int(np.searchsorted(cidx, ix))
            hit = (cs[pos] == steps) & (cmat[pos, cj] == 0)
            bad_s.append(steps[hit])
            bad_v.append(mat[hit, j])
    if not bad_s:
        return np.zeros(0), np.zeros(0)
    bs, bv = np.concatenate(bad_s), np.concatenate(bad_v)
    order = np.argsort(bs, kind="stable")
    return bs[order], bv[order]


def eigen_chart(view: ReportView, prefix: str, *, group: str, height: int = 210, bottom: bool = True) -> Chart:
    """Top-k eigenvalues of every run (hollow red: not converged; grey marks: failed estimates)."""
    metric = f"{prefix}_eigenvalue"
    lines: list[Line] = []
    marks: list[Mark] = []
    for i, run in runs_with(view, metric, f"{prefix}_bottom_eigenvalue"):
        keep = alert_steps(run)
        md = run.metric(metric)
        if md is not None and md.curve("all") is not None:
            steps, idx, mat = md.by_key["all"].table()
            single = len(view.runs) == 1
            colors = layer_colors(len(idx)) if single else [run_color(i)] * len(idx)
            for j, ix in enumerate(idx):
                # With several runs each run has one colour: the top eigenvalue is drawn thickest and named for
                # the run's others too, which get no legend entry of their own (k of them per run would
                # bury the chart under its legend; their values are in the tables below).
                width = 1.8 if j == 0 else 1.0
                label = f"λ{ix + 1}"
                if not single and j == 0 and len(idx) > 1:
                    label += f" (thick; λ{idx[1] + 1}-λ{idx[-1] + 1} thin)"
                lines.append(Line(run_label(view, run, label), steps, mat[:, j], _hex(colors[j]), run=i,
                                  keep=keep, width=width, legend=single or j == 0))
            bs, bv = _not_converged(run, prefix, steps, idx, mat)
            if len(bs):
                lines.append(Line(run_label(view, run, "not converged"), bs, bv, "#d62728", points=True, run=i))
        bmd = run.metric(f"{prefix}_bottom_eigenvalue")
        if bottom and bmd is not None and bmd.curve("all") is not None:
            bs, bv = bmd.curve("all")
            lines.append(Line(run_label(view, run, "bottom eigenvalue"), bs, bv,
                              "#7f7f7f" if len(view.runs) == 1 else run_color(i), dash="dash", run=i, keep=keep))
        marks += [Mark(float(st), "estimator_failed", i) for st in sorted(_failed_curvature_steps(run, prefix))]
    yv = np.concatenate([np.asarray(ln.y, dtype=float) for ln in lines]) if lines else np.zeros(0)
    yv = yv[np.isfinite(yv)]
    scale, linthresh = "linear", None
    if len(yv):
        if yv.min() > 0:
            scale = choose_scale([yv])
        elif np.abs(yv).max() > 0:
            scale, linthresh = "asinh", float(max(np.abs(yv).max() * 1e-2, 1e-12))
    name = "GGN" if prefix == "ggn" else "Hessian"
    chart = Chart(f"top-k {name} eigenvalues", "eigenvalue", lines, marks=marks, scale=scale, group=group,
                  height=height)
    chart.linthresh = linthresh
    return chart


def _hex(color: Any) -> str:
    if isinstance(color, str):
        return color
    r, g, b = (int(round(255 * c)) for c in color[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _draw_eigenvalues(view: ReportView, sink: ChartSink) -> str:
    out = []
    for prefix in ("hessian", "ggn"):
        metric = f"{prefix}_eigenvalue"
        if not view.has(metric, f"{prefix}_bottom_eigenvalue"):
            continue
        charts = [eigen_chart(view, prefix, group=f"eigen-{prefix}")]
        gap_lines = []
        tables = []
        for i, run in runs_with(view, metric, f"{prefix}_bottom_eigenvalue"):
            md = run.metric(metric)
            steps = np.zeros(0, dtype=np.int64)
            mat = np.zeros((0, 0))
            if md is not None and md.curve("all") is not None:
                steps, _idx, mat = md.by_key["all"].table()
                gaps = np.array([eigen_gap(r)[1] for r in mat]) if len(mat) else np.zeros(0)
                gap_lines.append(Line(run_label(view, run, "largest λm / λm+1"), steps, gaps, run_color(i), run=i,
                                      keep=alert_steps(run)))
            tables.append(_eigen_table(view, run, steps, mat, _failed_curvature_steps(run, prefix), prefix))
        if gap_lines:
            charts.append(Chart("bulk/outlier gap: largest ratio of consecutive top eigenvalues", "gap ratio",
                                gap_lines, group=f"eigen-{prefix}"))
        out.append(grid([sink.chart(c) for c in charts], 2))
        failed = any("failed" in t for t in tables)
        out.append(folded(f"Latest {prefix} eigenvalue estimates (tables)", "".join(tables), open_=failed))
    return "".join(out)


def _eigen_table(view: ReportView, run: RunView, steps: np.ndarray, mat: np.ndarray, failed: dict[int, str],
                 prefix: str) -> str:
    """The latest probes as a table; failed probes say 'failed' and why, never a number."""
    conv = run.metric(f"{prefix}_converged")
    conv_t = conv.by_key["all"].table() if conv is not None and "all" in conv.by_key else None
    all_steps = sorted(set(int(s) for s in steps[-6:]) | set(sorted(failed)[-6:]))[-6:]
    k = mat.shape[1] if mat.ndim == 2 else 0
    rows = []
    for s in all_steps:
        if s in failed:
            rows.append([s] + [("failed", "failed")] * k + [("failed", f"failed: {failed[s] or 'no reason given'}")])
            continue
        r = int(np.searchsorted(steps, s))
        cells = []
        flagged = False
        for j in range(k):
            v = mat[r, j]
            nc = False
            if conv_t is not None:
                cs, cidx, cmat = conv_t
                p = int(np.searchsorted(cs, s))
                if p < len(cs) and cs[p] == s and j < cmat.shape[1]:
                    nc = cmat[p, j] == 0
            flagged |= bool(nc)
            cells.append(("notconv", fmt(v) + " (not converged)") if nc else fmt(v))
        m, g = eigen_gap(mat[r]) if k else (0, float("nan"))
        note = f"{m} outlier(s), gap x{g:.3g}" if m else ""
        rows.append([s] + cells + [("notconv", "not converged; " + note) if flagged else note])
    head = [f"lambda_{j + 1}" for j in range(k)]
    title = f"Latest {prefix} eigenvalue estimates" + (f": {run.name}" if len(view.runs) > 1 else "")
    return f"<h3>{esc(title)}</h3>\n" + table_html(["step"] + head + ["status / gap"], rows)


EIGENVALUES = Panel(
    id="eigenvalues",
    title="Top Hessian eigenvalues and the bulk/outlier gap",
    metrics=("hessian_eigenvalue", "hessian_bottom_eigenvalue", "ggn_eigenvalue", "ggn_bottom_eigenvalue",
             "hessian_converged", "ggn_converged"),
    about=("The k largest (algebraic) eigenvalues of the loss Hessian from Lanczos on a basis kept "
           "orthogonal to within the square root of the working precision, and the smallest one. Network Hessians have a bulk near zero and roughly one "
           "outlier per class; the second chart shows the largest ratio between consecutive top eigenvalues, "
           "where a large gap separates the outliers from the bulk. Values whose Lanczos residual did not meet "
           "the tolerance are drawn hollow red; failed estimates are marked as failed and never drawn as numbers."),
    citation=("Sagun et al., 2017, Empirical Analysis of the Hessian of Over-Parametrized Neural Networks; "
              "Papyan, 2019, Measurements of Three-Level Hierarchical Structure in the Outliers in the Spectrum "
              "of Deepnet Hessians; Ghorbani, Krishnan and Xiao, 2019, An Investigation into Neural Net "
              "Optimization via Hessian Eigenvalue Density."),
    draw=_draw_eigenvalues,
)


# --- spectral density ----------------------------------------------------------------------------------


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7), enough for display."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _node_sets(run: RunView, prefix: str) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Return steps and, per step, (nodes, weights normalised to sum 1), finite entries only."""
    nmd, wmd = run.metric(f"{prefix}_density_node"), run.metric(f"{prefix}_density_weight")
    if nmd is None or wmd is None or "all" not in nmd.by_key or "all" not in wmd.by_key:
        return np.zeros(0, dtype=np.int64), []
    ns, nidx, nmat = nmd.by_key["all"].table()
    ws, widx, wmat = wmd.by_key["all"].table()
    steps, out = [], []
    for r, s in enumerate(ns):
        p = int(np.searchsorted(ws, s))
        if p >= len(ws) or ws[p] != s:
            continue
        common, ni, wi = np.intersect1d(nidx, widx, return_indices=True)
        n, w = nmat[r, ni], wmat[p, wi]
        ok = np.isfinite(n) & np.isfinite(w) & (w >= 0)
        if not ok.any() or w[ok].sum() <= 0:
            continue
        steps.append(int(s))
        out.append((n[ok], w[ok] / w[ok].sum()))
    return np.array(steps, dtype=np.int64), out


def _kernel_std(nodes: np.ndarray) -> float:
    return math.sqrt(SIGMA2 * max(1.0, float(nodes.max() - nodes.min())))


def smoothed_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian-smoothed SLQ density on ``grid``: sum_j w_j N(x; node_j, s^2), s^2 = SIGMA2 max(1, range).

    Cost O(len(grid) x len(nodes)).
    """
    s = _kernel_std(nodes)
    z = (grid[:, None] - nodes[None, :]) / s
    return (np.exp(-0.5 * z * z) * weights[None, :]).sum(axis=1) / (s * math.sqrt(2 * math.pi))


def binned_density(nodes: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Average smoothed density in each bin: exact integral of the Gaussian kernels over the bin / width."""
    s = _kernel_std(nodes)
    cdf = 0.5 * (1.0 + _erf((edges[:, None] - nodes[None, :]) / (s * math.sqrt(2.0))))
    mass = (np.diff(cdf, axis=0) * weights[None, :]).sum(axis=1)
    return mass / np.diff(edges)


def _symlog_ticks(axis: Any, lo: float, hi: float, c: float) -> None:
    """0 and signed powers of ten at least 10 x the linear range: ticks inside it would overlap."""
    from matplotlib.ticker import FixedLocator, NullLocator

    top = max(abs(lo), abs(hi))
    k = math.ceil(math.log10(10 * c))
    ticks = [0.0] if lo <= 0 <= hi else []
    while 10.0 ** k <= top:
        ticks += [s * 10.0 ** k for s in (-1, 1) if lo <= s * 10.0 ** k <= hi]
        k += 1
    axis.set_major_locator(FixedLocator(sorted(ticks)))
    axis.set_minor_locator(NullLocator())


def _draw_density(view: ReportView, sink: FigureSink) -> str:
    out = []
    for prefix in ("hessian", "ggn"):
        data = [(i, run, *_node_sets(run, prefix)) for i, run in enumerate(view.runs)]
        data = [d for d in data if len(d[2])]
        if not data:
            continue
        fig, axes = sink.new(len(data), 2, height=2.8, sharex=False)
        for row, (_i, run, steps, sets) in enumerate(data):
            hax, dax = axes[row, 0], axes[row, 1]
            allnodes = np.concatenate([n for n, _ in sets])
            lo, hi = float(allnodes.min()), float(allnodes.max())
            pad = 0.02 * max(hi - lo, 1e-12) + 4 * _kernel_std(allnodes)
            lo, hi = lo - pad, hi + pad
            c = max(1e-2 * max(abs(lo), abs(hi)), 1e-12)  # symlog linear threshold
            t = np.linspace(np.arcsinh(lo / c), np.arcsinh(hi / c), DENSITY_BINS + 1)
            edges = c * np.sinh(t)
            sel = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), MAX_DENSITY_COLUMNS)).astype(int))
            cols = np.vstack([binned_density(*sets[j], edges) for j in sel]).T
            xedges = midpoint_edges(steps[sel].astype(float))
            if len(sel) > 1:
                # the axis starts at the first probe and ends at the last, not half a probe outside
                xedges[0], xedges[-1] = float(steps[sel][0]), float(steps[sel][-1])
            top = cols[np.isfinite(cols)].max() if np.isfinite(cols).any() else 1.0
            logd = np.log10(np.maximum(cols, top * 1e-8))
            mesh = hax.pcolormesh(xedges, edges, logd, cmap="magma", shading="flat", rasterized=True)
            hax.set_yscale("symlog", linthresh=c)
            _symlog_ticks(hax.yaxis, lo, hi, c)
            hax.grid(False)
            fig.colorbar(mesh, ax=hax, fraction=0.04, pad=0.01).set_label("log10 density")
            hax.set_xlabel("step")
            hax.set_ylabel("eigenvalue")
            # Short enough, with the run's name, not to run into the next plot's title.
            hax.set_title(f"{prefix} density by step" +
                          (f": {mpl_text(run.name, 24)}" if len(view.runs) > 1 else ""), loc="left")
            pick = sorted(set(np.linspace(0, len(steps) - 1, min(4, len(steps))).astype(int).tolist()))
            cols4 = layer_colors(len(pick))
            for color, j in zip(cols4, pick):
                n, w = sets[j]
                s = _kernel_std(n)
                xs = np.unique(np.concatenate([np.linspace(lo, hi, 1200),
                                               (n[:, None] + s * np.linspace(-4, 4, 17)[None, :]).ravel()]))
                d = smoothed_density(n, w, xs)
                dax.plot(xs, np.maximum(d, d.max() * 1e-5), color=color, label=f"step {int(steps[j])}", lw=0.9)
            dax.set_xscale("symlog", linthresh=c)
            _symlog_ticks(dax.xaxis, lo, hi, c)
            dax.set_yscale("log")
            dax.set_xlabel("eigenvalue (symmetric log)")
            dax.set_ylabel("density")
            dax.set_title("individual densities", loc="left")
            dax.legend(frameon=False, fontsize=6.5)
        out.append(sink.render(fig, f"{prefix} spectral density over steps"))
    return "".join(out)


DENSITY = Panel(
    id="density",
    title="Hessian spectral density",
    metrics=("hessian_density_node", "hessian_density_weight", "ggn_density_node", "ggn_density_weight"),
    about=("The eigenvalue density of the Hessian by stochastic Lanczos quadrature: each probe's Ritz values "
           "(nodes) and weights are stored and re-smoothed here with a Gaussian kernel of variance "
           "1e-5 x max(1, range). The heatmap shows the density (log colour) against eigenvalue (symmetric "
           "log axis) and step; the right plot shows a few steps. Mass far from zero is the outliers; "
           "negative mass shows non-convex directions, which usually shrink as training settles."),
    citation=("Ghorbani, Krishnan and Xiao, 2019, An Investigation into Neural Net Optimization via Hessian "
              "Eigenvalue Density; Ubaru, Chen and Saad, 2017, Fast Estimation of tr(f(A)) via Stochastic "
              "Lanczos Quadrature."),
    draw=_draw_density,
)


# --- trace ------------------------------------------------------------------------------------------------


def _draw_trace(view: ReportView, sink: ChartSink) -> str:
    charts = []
    for prefix in ("hessian", "ggn"):
        if not view.has(f"{prefix}_trace"):
            continue
        lines: list[Line] = []
        bands = []
        for i, run in runs_with(view, f"{prefix}_trace"):
            c = run.curve(f"{prefix}_trace")
            if c is None:
                continue
            s, v = c
            color = run_color(i)
            lines.append(Line(run_label(view, run, "estimate"), s, v, color, run=i, keep=alert_steps(run), width=1.6))
            ec = run.curve(f"{prefix}_trace_stderr")
            if ec is not None:
                pos = np.minimum(np.searchsorted(ec[0], s), len(ec[0]) - 1)
                err = np.where(ec[0][pos] == s, ec[1][pos], np.nan)
                hi = len(lines)
                lines.append(Line(run_label(view, run, "+2 stderr"), s, v + 2 * err, color, width=0.5, run=i,
                                  markers=False))
                lines.append(Line(run_label(view, run, "−2 stderr"), s, v - 2 * err, color, width=0.5, run=i,
                                  markers=False))
                bands.append((hi, hi + 1, _rgba(color, 0.18)))
        charts.append(Chart(f"{prefix} trace (Hutchinson / Hutch++), band: ± 2 standard errors", "trace", lines,
                            bands=bands, group="trace"))
    if view.has("trace_ratio"):
        lines = [Line(run_label(view, run, "Tr(H)·lr/2"), *run.curve("trace_ratio"), run_color(i), run=i)
                 for i, run in runs_with(view, "trace_ratio") if run.curve("trace_ratio") is not None]
        charts.append(Chart("Tr(H)·lr/2 (SGD's linear-stability bound is 1)", "ratio", lines,
                            [Rule(1.0, "bound: 1")], scale=choose_scale([ln.y for ln in lines]), group="trace"))
    return grid([sink.chart(c) for c in charts], 2)


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[k:k + 2], 16) for k in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


TRACE = Panel(
    id="trace",
    title="Hessian trace",
    metrics=("hessian_trace", "hessian_trace_stderr", "ggn_trace", "ggn_trace_stderr", "trace_ratio"),
    about=("The trace of the Hessian (sum of all eigenvalues) estimated from random probes, with a band of "
           "two standard errors: a band that is wide compared with the changes over steps means those changes "
           "are noise. Hutch++ is far more accurate than plain Hutchinson when a few outliers dominate. For SGD, "
           "linearly stable minima satisfy Tr(H) lr / 2 <= 1."),
    citation=("Hutchinson, 1990, A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian "
              "Smoothing Splines; Meyer, Musco, Musco and Woodruff, 2021, Hutch++: Optimal Stochastic Trace "
              "Estimation; Wu and Su, 2023, The Implicit Regularization of Dynamical Stability in Stochastic "
              "Gradient Descent."),
    draw=_draw_trace,
)


# --- gradient subspace -----------------------------------------------------------------------------------


def _draw_subspace(view: ReportView, sink: ChartSink) -> str:
    groups = [
        ("fraction of the gradient / update in the top-k Hessian subspace",
         ["grad_subspace_fraction", "update_subspace_fraction", "grad_hessian_overlap"]),
        ("overlap of the top-k subspace with the previous probe and with the reference",
         ["subspace_overlap_prev", "subspace_overlap_ref"]),
    ]
    charts = []
    for title, metrics in groups:
        metrics = [m for m in metrics if view.has(m)]
        if not metrics:
            continue
        lines = []
        for i, run in runs_with(view, *metrics):
            for metric, dash in zip(metrics, ("solid", "dash", "dot", "dashdot")):
                c = run.curve(metric)
                if c is not None:
                    lines.append(Line(run_label(view, run, metric), c[0], c[1], run_color(i), dash=dash, run=i,
                                      keep=alert_steps(run)))
        lo = min((float(np.nanmin(ln.y)) for ln in lines if np.isfinite(ln.y).any()), default=0.0)
        charts.append(Chart(title, "fraction / overlap", lines, yrange=(-1.05 if lo < 0 else -0.03, 1.03),
                            group="subspace"))
    return grid([sink.chart(c) for c in charts], 2)


SUBSPACE = Panel(
    id="subspace",
    title="Gradient-subspace alignment",
    metrics=("grad_subspace_fraction", "update_subspace_fraction", "grad_hessian_overlap",
             "subspace_overlap_prev", "subspace_overlap_ref"),
    about=("The fraction |P_k g|^2 / |g|^2 of the gradient (and of the optimizer's update) lying in the span "
           "of the top-k Hessian eigenvectors, the one-product proxy g'Hg / (|g| |Hg|), and the overlap "
           "(1/k) Tr(P_t P_t') of the top subspace with the previous probe and a reference. A high fraction "
           "says the gradient lives in the high-curvature directions, not that learning happens there; an "
           "overlap near 1 says the top subspace has stopped rotating."),
    citation=("Gur-Ari, Roberts and Dyer, 2018, Gradient Descent Happens in a Tiny Subspace; Song, Ahn and Yun, "
              "2025, Does SGD Really Happen in Tiny Subspaces?"),
    draw=_draw_subspace,
)
