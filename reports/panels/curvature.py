"""Panels on loss curvature: sharpness and the edge of stability, top eigenvalues, spectral density,
trace, and gradient-subspace alignment."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..downsample import midpoint_edges, minmax_indices
from ..figures import FigureSink, finite_or_nan, layer_colors, mark_alerts, mpl_text, plot_curve, run_color
from ..views import ReportView, RunView
from .base import Panel, add_legend, alert_steps, esc, fmt, run_label, runs_with, table_html

LINESTYLES = ["-", "--", ":", "-."]
# SLQ kernel: variance SIGMA2 * max(1, lambda_max - lambda_min), as in PyHessian's density.
SIGMA2 = 1e-5
DENSITY_BINS = 160
MAX_DENSITY_COLUMNS = 150


# --- sharpness ---------------------------------------------------------------------------------------


def _threshold_curve(run: RunView) -> tuple[np.ndarray, np.ndarray, str] | None:
    """2/lr from ``stability_threshold``, else computed from ``learning_rate``."""
    c = run.curve("stability_threshold")
    if c is not None:
        return c[0], c[1], "2/lr"
    c = run.curve("learning_rate")
    if c is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            return c[0], np.where(c[1] > 0, 2.0 / c[1], np.nan), "2/lr (from learning_rate)"
    return None


def _ratio_axes(view: ReportView, ax: Any, series: list[tuple[str, str, str]], ylabel: str, title: str,
                alerts: tuple[str, ...] = ()) -> None:
    """Draw ratios whose critical level is 1 (``series``: metric, label, line style) with a line at 1."""
    for i, run in runs_with(view, *(m for m, _, _ in series)):
        for metric, label, ls in series:
            c = run.curve(metric)
            if c is not None:
                plot_curve(ax, c[0], c[1], label=run_label(view, run, label), color=run_color(i), ls=ls,
                           keep_steps=alert_steps(run))
        if alerts:
            mark_alerts(ax, run.events, kinds=alerts)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title, loc="left")
    add_legend(ax, fontsize=7)


def _draw_sharpness(view: ReportView, sink: FigureSink) -> str:
    top = ("sharpness", "adam_sharpness", "stability_threshold", "adam_threshold")
    ratios = [m for m in ("sharpness_ratio", "adam_sharpness_ratio") if view.has(m)]
    nrows = (1 if view.has(*top) else 0) + (1 if ratios else 0)
    fig, axes = sink.new(nrows, 1, height=2.6)
    row = 0
    if view.has(*top):
        ax = axes[row, 0]
        row += 1
        positive = True
        for i, run in runs_with(view, *top):
            keep = alert_steps(run)
            color = run_color(i)
            curves = []
            for metric, ls, what in (("sharpness", "-", "sharpness"), ("adam_sharpness", "-.", "Adam sharpness")):
                c = run.curve(metric)
                if c is not None:
                    plot_curve(ax, c[0], c[1], label=run_label(view, run, what), color=color, ls=ls, keep_steps=keep)
                    curves.append(c[1])
            thr = _threshold_curve(run) if run.has("sharpness") or run.has("stability_threshold") else None
            if thr is not None:
                plot_curve(ax, thr[0], thr[1], label=run_label(view, run, thr[2]), color=color, ls="--",
                           keep_steps=keep, alpha=0.7)
                curves.append(thr[1])
            c = run.curve("adam_threshold")
            if c is not None:
                plot_curve(ax, c[0], c[1], label=run_label(view, run, "Adam threshold (2+2b1)/((1-b1)lr)"),
                           color=color, ls=":", keep_steps=keep, alpha=0.7)
                curves.append(c[1])
            for v in curves:
                f = v[np.isfinite(v)]
                positive &= bool(len(f) == 0 or f.min() > 0)
        if positive:
            ax.set_yscale("log")
        ax.set_ylabel("eigenvalue")
        ax.set_title("sharpness (lambda_max) against the stability threshold", loc="left")
        add_legend(ax, fontsize=7)
    if ratios:
        _ratio_axes(view, axes[row, 0], [(m, m, ls) for m, ls in zip(ratios, ("-", "-."))],
                    "ratio (1 = edge)", "sharpness x lr / 2 (1 is the edge of stability)",
                    alerts=("edge_of_stability",))
    axes[-1, 0].set_xlabel("step")
    return sink.render(fig, "sharpness against 2/lr")


SHARPNESS = Panel(
    id="sharpness",
    title="Sharpness and the edge of stability",
    metrics=("sharpness", "stability_threshold", "sharpness_ratio", "adam_sharpness", "adam_threshold",
             "adam_sharpness_ratio"),
    about=("Sharpness is the largest eigenvalue of the training-loss Hessian. Gradient descent with step lr is "
           "stable on a quadratic only while sharpness < 2/lr; full-batch training typically sharpens until it "
           "reaches 2/lr and then hovers there (the edge of stability), so a ratio sharpness x lr / 2 near 1 is "
           "expected, not alarming. For Adam the preconditioned sharpness is compared with (2 + 2 beta1) / "
           "((1 - beta1) lr), 38/lr for beta1 = 0.9."),
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


def _draw_eigenvalues(view: ReportView, sink: FigureSink) -> str:
    out = []
    for prefix in ("hessian", "ggn"):
        metric = f"{prefix}_eigenvalue"
        if not view.has(metric, f"{prefix}_bottom_eigenvalue"):
            continue
        fig, axes = sink.new(2, 1, height=2.5)
        ax, gax = axes[0, 0], axes[1, 0]
        tables = []
        for i, run in runs_with(view, metric, f"{prefix}_bottom_eigenvalue"):
            keep = alert_steps(run)
            md = run.metric(metric)
            failed = _failed_curvature_steps(run, prefix)
            steps = np.zeros(0, dtype=np.int64)
            mat = np.zeros((0, 0))
            if md is not None and md.curve("all") is not None:
                steps, idx, mat = md.by_key["all"].table()
                colors = layer_colors(len(idx)) if len(view.runs) == 1 else [run_color(i)] * len(idx)
                for j, ix in enumerate(idx):
                    lab = f"lambda_{ix + 1}" if len(view.runs) == 1 else (run.name if j == 0 else None)
                    plot_curve(ax, steps, mat[:, j], label=lab, color=colors[j], keep_steps=keep, lw=0.9)
                conv = run.metric(f"{prefix}_converged")
                if conv is not None and conv.curve("all") is not None:
                    cs, cidx, cmat = conv.by_key["all"].table()
                    bad_s, bad_v = [], []
                    for j, ix in enumerate(idx):
                        if ix in cidx:
                            cj = int(np.searchsorted(cidx, ix))
                            pos = np.searchsorted(cs, steps)
                            pos = np.minimum(pos, len(cs) - 1)
                            hit = (cs[pos] == steps) & (cmat[pos, cj] == 0)
                            bad_s.append(steps[hit])
                            bad_v.append(mat[hit, j])
                    if bad_s and sum(len(b) for b in bad_s):
                        bs, bv = np.concatenate(bad_s), np.concatenate(bad_v)
                        if len(bs) > 2000:
                            sel = np.linspace(0, len(bs) - 1, 2000).astype(int)
                            bs, bv = bs[sel], bv[sel]
                        ax.plot(bs, finite_or_nan(bv), ls="none", marker="o", mfc="none", mec="red", ms=4,
                                label="not converged")
                gaps = np.array([eigen_gap(r)[1] for r in mat]) if len(mat) else np.zeros(0)
                plot_curve(gax, steps, gaps, label=run_label(view, run, "largest ratio lambda_m / lambda_m+1"),
                           color=run_color(i), keep_steps=keep)
            bmd = run.metric(f"{prefix}_bottom_eigenvalue")
            if bmd is not None and bmd.curve("all") is not None:
                bs, bv = bmd.curve("all")
                plot_curve(ax, bs, bv, label=run_label(view, run, "bottom eigenvalue"),
                           color="grey" if len(view.runs) == 1 else run_color(i), ls="--", keep_steps=keep)
            if failed:
                from matplotlib import transforms

                fs = np.array(sorted(failed))
                trans = transforms.blended_transform_factory(ax.transData, ax.transAxes)
                ax.plot(fs, np.full(len(fs), 0.05), ls="none", marker="X", color="grey", ms=5,
                        transform=trans, label="estimate failed", clip_on=False)
            tables.append(_eigen_table(view, run, steps, mat, failed, prefix))
        fin = [v for v in ax.get_lines() if len(v.get_ydata())]
        yv = np.concatenate([np.asarray(v.get_ydata(), dtype=float) for v in fin]) if fin else np.zeros(0)
        yv = yv[np.isfinite(yv)]
        if len(yv):
            top = float(np.max(np.abs(yv)))
            if yv.min() > 0:
                ax.set_yscale("log")
            else:
                ax.set_yscale("symlog", linthresh=max(top * 1e-2, 1e-12))
        ax.set_ylabel("eigenvalue")
        ax.set_title(f"top-k {prefix.upper() if prefix == 'ggn' else 'Hessian'} eigenvalues (hollow red: not "
                     "converged)", loc="left")
        add_legend(ax, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=6.5)
        gax.set_ylabel("gap ratio")
        gax.set_title("bulk/outlier gap: largest ratio of consecutive top eigenvalues", loc="left")
        add_legend(gax, fontsize=7)
        gax.set_xlabel("step")
        out.append(sink.render(fig, f"top {prefix} eigenvalues over steps"))
        out.extend(tables)
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
    metrics=("hessian_eigenvalue", "hessian_bottom_eigenvalue", "ggn_eigenvalue", "ggn_bottom_eigenvalue"),
    about=("The k largest (algebraic) eigenvalues of the loss Hessian from Lanczos with full "
           "reorthogonalisation, and the smallest one. Network Hessians have a bulk near zero and roughly one "
           "outlier per class; the lower plot shows the largest ratio between consecutive top eigenvalues, "
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
            top = cols[np.isfinite(cols)].max() if np.isfinite(cols).any() else 1.0
            logd = np.log10(np.maximum(cols, top * 1e-8))
            mesh = hax.pcolormesh(xedges, edges, logd, cmap="magma", shading="flat", rasterized=True)
            hax.set_yscale("symlog", linthresh=c)
            hax.grid(False)
            fig.colorbar(mesh, ax=hax, fraction=0.04, pad=0.01).set_label("log10 density")
            hax.set_xlabel("step")
            hax.set_ylabel("eigenvalue")
            hax.set_title(mpl_text(f"{prefix} spectral density over steps" +
                                   (f": {run.name}" if len(view.runs) > 1 else ""), 80), loc="left")
            pick = sorted(set(np.linspace(0, len(steps) - 1, min(4, len(steps))).astype(int).tolist()))
            cols4 = layer_colors(len(pick))
            for color, j in zip(cols4, pick):
                n, w = sets[j]
                s = _kernel_std(n)
                grid = np.unique(np.concatenate([np.linspace(lo, hi, 1200),
                                                 (n[:, None] + s * np.linspace(-4, 4, 17)[None, :]).ravel()]))
                d = smoothed_density(n, w, grid)
                dax.plot(grid, np.maximum(d, d.max() * 1e-5), color=color, label=f"step {int(steps[j])}", lw=0.9)
            dax.set_xscale("symlog", linthresh=c)
            dax.set_yscale("log")
            dax.set_xlabel("eigenvalue (symmetric log)")
            dax.set_ylabel("density")
            dax.set_title("individual densities", loc="left")
            add_legend(dax, fontsize=6.5)
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


def _draw_trace(view: ReportView, sink: FigureSink) -> str:
    prefixes = [p for p in ("hessian", "ggn") if view.has(f"{p}_trace")]
    ratio = view.has("trace_ratio")
    nrows = len(prefixes) + (1 if ratio else 0)
    if not nrows:
        return ""
    fig, axes = sink.new(nrows, 1, height=2.4)
    for ax, prefix in zip(axes[:, 0], prefixes):
        for i, run in runs_with(view, f"{prefix}_trace"):
            c = run.curve(f"{prefix}_trace")
            if c is None:
                continue
            s, v = c
            color = run_color(i)
            plot_curve(ax, s, v, label=run_label(view, run, "mean"), color=color, keep_steps=alert_steps(run))
            ec = run.curve(f"{prefix}_trace_stderr")
            if ec is not None:
                pos = np.searchsorted(ec[0], s)
                pos = np.minimum(pos, len(ec[0]) - 1)
                err = np.where(ec[0][pos] == s, ec[1][pos], np.nan)
                idx = minmax_indices(v, 800)
                ss, vv, ee = s[idx], finite_or_nan(v[idx]), finite_or_nan(err[idx])
                ax.fill_between(ss, vv - 2 * ee, vv + 2 * ee, color=color, alpha=0.2, lw=0,
                                label=run_label(view, run, "+/- 2 stderr"))
        ax.set_ylabel("trace")
        ax.set_title(f"{prefix} trace (Hutchinson / Hutch++), band: +/- 2 standard errors", loc="left")
        add_legend(ax, fontsize=7)
    if ratio:
        _ratio_axes(view, axes[-1, 0], [("trace_ratio", "Tr(H) lr / 2", "-")], "ratio",
                    "Tr(H) x lr / 2 (SGD's linear-stability bound is 1)")
    axes[-1, 0].set_xlabel("step")
    return sink.render(fig, "Hessian trace over steps")


TRACE = Panel(
    id="trace",
    title="Hessian trace",
    metrics=("hessian_trace", "hessian_trace_stderr", "ggn_trace", "trace_ratio"),
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


def _draw_subspace(view: ReportView, sink: FigureSink) -> str:
    groups = [
        ("fraction of the gradient / update in the top-k Hessian subspace",
         ["grad_subspace_fraction", "update_subspace_fraction", "grad_hessian_overlap"]),
        ("overlap of the top-k subspace with the previous probe and with the reference",
         ["subspace_overlap_prev", "subspace_overlap_ref"]),
    ]
    groups = [(t, [m for m in ms if view.has(m)]) for t, ms in groups]
    groups = [(t, ms) for t, ms in groups if ms]
    fig, axes = sink.new(len(groups), 1, height=2.4)
    for ax, (title, metrics) in zip(axes[:, 0], groups):
        lo = 0.0
        for i, run in runs_with(view, *metrics):
            for metric, ls in zip(metrics, LINESTYLES):
                c = run.curve(metric)
                if c is None:
                    continue
                plot_curve(ax, c[0], c[1], label=run_label(view, run, metric), color=run_color(i), ls=ls,
                           keep_steps=alert_steps(run))
                f = c[1][np.isfinite(c[1])]
                if len(f):
                    lo = min(lo, float(f.min()))
        ax.set_ylim(-1.05 if lo < 0 else -0.03, 1.03)
        ax.set_title(title, loc="left")
        add_legend(ax, fontsize=7)
    axes[-1, 0].set_xlabel("step")
    return sink.render(fig, "gradient subspace fraction and subspace overlap")


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
