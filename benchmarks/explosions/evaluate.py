"""Evaluate every explosion detector offline on the suite's run stores, with an honest calibration split.

Usage (from the repository root, after ``python -m benchmarks.explosions.run_suite --out DIR``):

    python -m benchmarks.explosions.evaluate --runs DIR [--calib-seeds 0] [--out benchmarks/explosions/results.json]

Ground truth: the explosion step of each run (``explosion_step`` of its loss series, see explosion.py);
a run is *exploding* when it has one, *stable* otherwise, whatever its config was meant to do.

Detectors (each returns the steps where it alarms; only the first alarm counts):

- ``spectral_alignment`` (ours): :func:`diagnostics.explosion.detect` on ``sa_sign_diversity``.
- ``grad_norm_z``: z-score of the gradient norm against an EMA mean and variance (EMA weight ``alpha``),
  alarm when z > 2.5 after ``min_obs`` steps.
- ``loss_spike``: loss above ``factor`` times its EMA (after ``min_obs`` steps).
- ``max_attention_logit``: max over layers of the max pre-softmax logit above ``factor`` times its median
  over the warm-up window (steps 20..60).
- ``activation_kurtosis``: max over blocks of the residual-stream kurtosis above ``factor`` times its
  warm-up median.
- ``trainscope_<name>``: trainscope's anomaly detectors (``z_score``, ``percentile``, ``changepoint``,
  their defaults) fed the finite losses exactly as ``TrainScope.step`` feeds them in a training loop;
  they only read the loss, so running them on the stored loss series is the same computation.

Scores per detector: recall on exploding runs (an alarm at or before the explosion step), false alarms
on stable runs (any alarm), lead time = explosion step - first alarm step (median and range over the
detected exploding runs). Calibration: each detector's parameters (ours: a grid; baselines: their
threshold) are chosen on the runs whose seed is in ``--calib-seeds`` by the rule "fewest false alarms,
then highest recall, then largest median lead", and reported on the held-out seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.explosions.explosion import explosion_step
from diagnostics.explosion import detect_probes, series_probes

__all__ = ["RunData", "load_runs", "DETECTORS", "score", "calibrate", "main"]

WARM = (20, 60)  # warm-up window (steps) of the ratio baselines


@dataclass
class RunData:
    name: str
    config: str
    seed: int
    explosion: int | None
    final_step: int
    series: pd.DataFrame
    probes: dict[str, Any] = field(default_factory=dict)

    def metric(self, metric: str, agg: str | None = None) -> pd.Series:
        """A step-indexed series of ``metric`` (index 0); ``agg`` = "max" reduces over keys."""
        df = self.series[(self.series["metric"] == metric) & (self.series["index"] == 0)]
        if agg == "max":
            return df.groupby("step")["value"].max().sort_index()
        return df[df["key"] == "all"].set_index("step")["value"].sort_index()


def load_runs(root: Path) -> list[RunData]:
    """Every complete run store under ``root`` (one directory per run)."""
    from diagnostics.store import open_run

    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not any(d.glob("*.sqlite")):
            continue
        run = open_run(d)
        try:
            meta = run.meta
            if not meta.get("complete"):
                continue
            s = run.series()
        finally:
            run.close()
        cfg = meta.get("config", {})
        losses = s[(s.metric == "loss") & (s.key == "all")].sort_values("step")
        truth = explosion_step(list(losses["value"]), steps=list(losses["step"]))
        out.append(
            RunData(
                d.name,
                cfg.get("name", d.name),
                int(cfg.get("seed", 0)),
                truth,
                int(meta.get("final_step", losses["step"].max())),
                s,
            )
        )
    return out


# --- detectors: f(run, **params) -> first alarm step or None ------------------------------------------
def _first(steps: Iterable[int]) -> int | None:
    return next(iter(steps), None)


def ours(run: RunData, **params: Any) -> int | None:
    # detect() = series_probes() + detect_probes(); the probes are extracted once per run and statistic.
    stat = params.get("statistic", "sa_sign_diversity")
    if stat not in run.probes:
        run.probes[stat] = series_probes(run.series, stat)
    return _first(a["step"] for a in detect_probes(run.probes[stat], **params))


def grad_norm_z(run: RunData, z: float = 2.5, alpha: float = 0.05, min_obs: int = 20) -> int | None:
    mean = var = None
    for i, (step, g) in enumerate(run.metric("grad_norm").items()):
        if not math.isfinite(g):
            return int(step) if i >= min_obs else None
        if mean is None:
            mean, var = g, 0.0
            continue
        if i >= min_obs and var > 0 and (g - mean) / math.sqrt(var) > z:
            return int(step)
        d = g - mean
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return None


def loss_spike(run: RunData, factor: float = 1.3, alpha: float = 0.05, min_obs: int = 20) -> int | None:
    ema = None
    for i, (step, v) in enumerate(run.metric("loss").items()):
        if not math.isfinite(v):
            return int(step)
        if ema is not None and i >= min_obs and v > factor * ema:
            return int(step)
        ema = v if ema is None else ema + alpha * (v - ema)
    return None


def _ratio_growth(s: pd.Series, factor: float) -> int | None:
    base = s[(s.index >= WARM[0]) & (s.index < WARM[1])]
    if base.empty:
        return None
    b = float(base.median())
    later = s[s.index >= WARM[1]]
    hits = later[~later.apply(math.isfinite) | (later > factor * b)]
    return None if hits.empty else int(hits.index[0])


def max_attention_logit(run: RunData, factor: float = 3.0) -> int | None:
    return _ratio_growth(run.metric("max_attention_logit", "max"), factor)


def activation_kurtosis(run: RunData, factor: float = 3.0) -> int | None:
    return _ratio_growth(run.metric("activation_kurtosis", "max"), factor)


def _trainscope(name: str) -> Callable[..., int | None]:
    def run_detector(run: RunData, **params: Any) -> int | None:
        from trainscope.core.detectors import make_detector

        det = make_detector({"name": name, **params})
        for step, v in run.metric("loss").items():
            if not math.isfinite(v):  # TrainScope.step skips the detector on a non-finite loss
                continue
            if det.update(float(v)) is not None:
                return int(step)
        return None

    run_detector.__name__ = f"trainscope_{name}"
    return run_detector


# Each detector: (function, grid of parameters searched on the calibration seeds).
_OURS_GRID = {
    "statistic": ["sa_sign_diversity", "sa_abs_mean", "sa_sigma1"],
    "skip": [40],
    "warmup": [60],
    "smooth": [3],
    "rel_drop": [0.5],
    "min_drop": [0.2, 0.4],
    "z": [3.0, 5.0],
    "persistence": [3, 5, 10],
    "min_layers": [1, 2, 4, 6],
    "burst_layers": [None, 6],
}


def _grid(spec: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(spec)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(spec[k] for k in keys))]


DETECTORS: dict[str, tuple[Callable[..., int | None], list[dict[str, Any]]]] = {
    "spectral_alignment (ours)": (ours, _grid(_OURS_GRID)),
    "grad_norm_z (EMA, z>2.5)": (grad_norm_z, [{"z": 2.5, "alpha": a} for a in (0.02, 0.05, 0.1)]),
    "loss_spike": (loss_spike, [{"factor": f} for f in (1.1, 1.2, 1.3, 1.5, 2.0)]),
    "max_attention_logit growth": (max_attention_logit, [{"factor": f} for f in (1.5, 2, 3, 5, 10)]),
    "activation_kurtosis": (activation_kurtosis, [{"factor": f} for f in (1.5, 2, 3, 5, 10)]),
    "trainscope z_score": (_trainscope("z_score"), [{}]),
    "trainscope percentile": (_trainscope("percentile"), [{}]),
    "trainscope changepoint": (_trainscope("changepoint"), [{}]),
}


def score(fn: Callable[..., int | None], runs: list[RunData], params: dict[str, Any]) -> dict[str, Any]:
    """Recall, false alarms and lead times of one detector setting on ``runs``."""
    leads, missed, false_alarms, per_run = [], [], [], {}
    for r in runs:
        first = fn(r, **params)
        per_run[r.name] = first
        if r.explosion is None:
            if first is not None:
                false_alarms.append(r.name)
        elif first is not None and first <= r.explosion:
            leads.append(r.explosion - first)
        else:
            missed.append(r.name)
    n_exp = sum(r.explosion is not None for r in runs)
    return {
        "params": params,
        "exploding": n_exp,
        "stable": len(runs) - n_exp,
        "detected": len(leads),
        "recall": len(leads) / n_exp if n_exp else float("nan"),
        "false_alarms": len(false_alarms),
        "false_alarm_runs": false_alarms,
        "missed": missed,
        "lead_median": statistics.median(leads) if leads else None,
        "lead_min": min(leads) if leads else None,
        "lead_max": max(leads) if leads else None,
        "first_alarm": per_run,
    }


def _rank(res: dict[str, Any]) -> tuple[float, float, float]:
    return (
        res["false_alarms"],
        -res["recall"] if res["recall"] == res["recall"] else 0.0,
        -(res["lead_median"] or 0),
    )


def calibrate(
    fn: Callable[..., int | None], grid: list[dict[str, Any]], runs: list[RunData]
) -> dict[str, Any]:
    """The grid point with the fewest false alarms, then highest recall, then largest median lead."""
    return min((score(fn, runs, p) for p in grid), key=_rank)


def _frontier(calib: list[RunData], held: list[RunData]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """Our detector calibrated with a budget of k false alarms on the calibration runs, k = 0..#stable.

    Shows what recall and lead each false-alarm budget buys, and whether it holds on the held-out runs.
    """
    fn, grid = DETECTORS["spectral_alignment (ours)"]
    scored = [score(fn, calib, p) for p in grid]
    out = []
    n_stable = scored[0]["stable"] if scored else 0
    for k in range(n_stable + 1):
        ok = [r for r in scored if r["false_alarms"] <= k]
        if not ok:
            continue
        best = min(ok, key=lambda r: (-r["recall"], -(r["lead_median"] or 0), r["false_alarms"]))
        if out and best["params"] == out[-1][1]["params"]:
            continue
        out.append((k, best, score(fn, held, best["params"])))
    return out


def _fmt(res: dict[str, Any]) -> str:
    lead = (
        "-"
        if res["lead_median"] is None
        else f"{res['lead_median']:g} [{res['lead_min']}, {res['lead_max']}]"
    )
    return f"{res['detected']}/{res['exploding']} ({res['recall']:.0%}) | {res['false_alarms']}/{res['stable']} | {lead}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="directory of run stores (run_suite --out)")
    parser.add_argument("--calib-seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=None, help="write the full results as JSON here")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        print(f"no complete run stores under {args.runs}", file=sys.stderr)
        return 2
    calib = [r for r in runs if r.seed in args.calib_seeds]
    held = [r for r in runs if r.seed not in args.calib_seeds]
    print(
        f"{len(runs)} runs: {sum(r.explosion is not None for r in runs)} exploding; calibration seeds "
        f"{args.calib_seeds} ({len(calib)} runs), held-out {len(held)} runs"
    )
    results: dict[str, Any] = {}
    print(
        "| detector | calibrated params | recall (held-out) | false alarms (held-out) | lead median [min, max] (held-out) | all runs |"
    )
    print("|---|---|---|---|---|---|")
    for name, (fn, grid) in DETECTORS.items():
        try:
            best = calibrate(fn, grid, calib) if calib else {"params": grid[0]}
        except ImportError as exc:
            print(f"| {name} | not run: {exc} | | | | |")
            continue
        params = best["params"]
        test = score(fn, held, params) if held else None
        full = score(fn, runs, params)
        results[name] = {"calibration": best, "held_out": test, "all": full}
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"
        t = _fmt(test).split(" | ") if test else ["-", "-", "-"]
        print(f"| {name} | {shown} | {t[0]} | {t[1]} | {t[2]} | {_fmt(full)} |")
    frontier = _frontier(calib, held) if calib and held else []
    if frontier:
        print(
            "\nOurs calibrated under a false-alarm budget (at most k false alarms on the calibration runs):"
        )
        print(
            "| k | calibrated params | calibration: recall, false alarms | held-out: recall | held-out: false alarms | held-out: lead median [min, max] |"
        )
        print("|---|---|---|---|---|---|")
        for k, cal, test in frontier:
            shown = ", ".join(
                f"{a}={b}"
                for a, b in cal["params"].items()
                if a not in ("skip", "warmup", "smooth", "rel_drop")
            )
            t = _fmt(test).split(" | ")
            print(
                f"| {k} | {shown} | {cal['detected']}/{cal['exploding']}, {cal['false_alarms']}/{cal['stable']} | {t[0]} | {t[1]} | {t[2]} |"
            )
    results["frontier"] = [{"k": k, "calibration": c, "held_out": t} for k, c, t in frontier]
    if args.out:
        truth = {r.name: r.explosion for r in runs}
        args.out.write_text(json.dumps({"explosion_step": truth, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
