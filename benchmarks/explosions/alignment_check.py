"""Does a collapse of sign diversity come before growth of sigma_1, as the spectral-alignment story says?

For every recorded run and linear map, over the steps before the explosion (or the whole stable run):

- forward: Spearman correlation of (1 - sign diversity) at step t with log sigma_1(t + 20) - log sigma_1(t);
- reversed: the same (1 - sign diversity) at t with the growth that already happened,
  log sigma_1(t) - log sigma_1(t - 20).

If one-sidedness drives the growth, the forward correlation should be positive and at least as strong as
the reversed one. Reported pooled over all (run, map, step) triples and as the median of the per-(run,
map) correlations, for all runs and for exploding and stable runs apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import spearmanr

from benchmarks.explosions.signals import RunSignals

__all__ = ["LAG", "sign_diversity_vs_sigma_growth"]

LAG = 20


def _pairs(run: RunSignals, forward: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    end = run.explosion if run.explosion is not None else run.steps
    sd, s1 = run.layers["sign_diversity"][:end], run.layers["sigma1"][:end]
    out = []
    if end <= 2 * LAG:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s1 = np.log(s1)
    for j in range(sd.shape[1]):
        if forward:
            x, y = 1 - sd[: end - LAG, j], log_s1[LAG:, j] - log_s1[: end - LAG, j]
        else:
            x, y = 1 - sd[LAG:, j], log_s1[LAG:, j] - log_s1[: end - LAG, j]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() > 10:
            out.append((x[ok], y[ok]))
    return out


def _summary(runs: list[RunSignals], forward: bool) -> dict[str, float]:
    pairs = [p for r in runs for p in _pairs(r, forward)]
    if not pairs:
        return {"pooled": float("nan"), "median_per_map": float("nan"), "maps": 0}
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    per = [spearmanr(a, b).statistic for a, b in pairs if np.ptp(a) > 0 and np.ptp(b) > 0]
    return {"pooled": float(spearmanr(x, y).statistic), "median_per_map": float(np.nanmedian(per)),
            "maps": len(pairs)}


def sign_diversity_vs_sigma_growth(runs: list[RunSignals]) -> dict[str, Any]:
    """``{group: {"forward": {...}, "reversed": {...}}}`` for groups all, exploding, stable."""
    groups = {"all": runs, "exploding": [r for r in runs if r.explosion is not None],
              "stable": [r for r in runs if r.explosion is None]}
    return {g: {"forward": _summary(rs, True), "reversed": _summary(rs, False)} for g, rs in groups.items()}
