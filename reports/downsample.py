"""Display-side reduction of long series: keep extremes and alert steps, bin heatmaps.

A 100,000-step series drawn point by point makes a multi-megabyte figure that looks the same as one
drawn from the per-bucket minimum and maximum. These helpers pick the points worth drawing; they never
change the numbers that are shown.
"""

from __future__ import annotations

import numpy as np


def minmax_indices(values: np.ndarray, buckets: int = 1000, keep: np.ndarray | None = None) -> np.ndarray:
    """Return sorted indices that keep each bucket's minimum and maximum.

    Also keeps the first and last point, the first non-finite point of each bucket (so gaps and
    non-finite markers survive) and every index in ``keep`` (alert steps).

    Args:
        values: 1-D array of length n.
        buckets: number of equal-width buckets; series shorter than ``2 * buckets + 2`` are kept whole.
        keep: indices that must survive.

    Returns:
        int64 array of at most ``3 * buckets + 2 + len(keep)`` indices. Cost O(n).
    """
    n = len(values)
    if n <= 2 * buckets + 2:
        return np.arange(n, dtype=np.int64)
    width = -(-n // buckets)
    nb = -(-n // width)
    v = np.full(nb * width, np.nan)
    v[:n] = values
    v = v.reshape(nb, width)
    finite = np.isfinite(v)
    lo = np.where(finite, v, np.inf).argmin(axis=1)
    hi = np.where(finite, v, -np.inf).argmax(axis=1)
    base = np.arange(nb, dtype=np.int64) * width
    nonfinite = ~finite
    nonfinite[-1, n - (nb - 1) * width:] = False  # padding is not data
    has_nf = nonfinite.any(axis=1)
    first_nf = nonfinite.argmax(axis=1)
    parts = [base + lo, base + hi, np.array([0, n - 1]), (base + first_nf)[has_nf]]
    if keep is not None and len(keep):
        parts.append(np.asarray(keep, dtype=np.int64))
    idx = np.unique(np.concatenate(parts))
    return idx[(idx >= 0) & (idx < n)]


def downsample(steps: np.ndarray, values: np.ndarray, buckets: int = 1000,
               keep_steps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(steps, values)`` reduced by :func:`minmax_indices`, keeping the given steps.

    ``steps`` must be sorted. Cost O(n + len(keep_steps) log n).
    """
    keep = None
    if keep_steps is not None and len(keep_steps) and len(steps):
        ks = np.asarray(keep_steps)
        pos = np.searchsorted(steps, ks)
        inside = pos < len(steps)
        pos, ks = pos[inside], ks[inside]
        keep = pos[steps[pos] == ks]
    idx = minmax_indices(values, buckets, keep)
    return steps[idx], values[idx]


def step_bins(lo: float, hi: float, nbins: int) -> np.ndarray:
    """Return ``nbins + 1`` bin edges covering the steps ``[lo, hi]`` (integer steps, half-open bins)."""
    span = max(hi - lo + 1, 1)
    nbins = max(1, min(nbins, int(span)))
    return np.linspace(lo, hi + 1, nbins + 1)


def midpoint_edges(steps: np.ndarray) -> np.ndarray:
    """Return ``len(steps) + 1`` edges with one cell per recorded step, split halfway between neighbours.

    A single step gets the cell ``[step - 0.5, step + 0.5]``.
    """
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2.0
    return np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])


def bin_series(steps: np.ndarray, values: np.ndarray, edges: np.ndarray, how: str = "mean") -> np.ndarray:
    """Reduce one sorted series onto step bins.

    Args:
        steps: sorted steps, shape [n]. values: shape [n] (NaN/inf allowed; ignored except that a bin
            holding only non-finite values is NaN).
        edges: bin edges from :func:`step_bins`, shape [b + 1].
        how: ``"mean"``, ``"min"`` or ``"max"`` of the finite values in each bin.

    Returns:
        float64 array [b], NaN for bins without finite values. Cost O(n + b).
    """
    nb = len(edges) - 1
    out = np.full(nb, np.nan)
    if len(steps) == 0:
        return out
    v = np.where(np.isfinite(values), values, np.nan)
    starts = np.searchsorted(steps, edges[:-1], side="left")
    ends = np.searchsorted(steps, edges[1:], side="left")
    nonempty = ends > starts
    if not nonempty.any():
        return out
    s = starts[nonempty]
    finite = np.isfinite(v)
    counts = np.add.reduceat(finite.astype(np.int64), s)
    # reduceat over the starts of non-empty bins: each slice runs to the next start, which is that
    # bin's end because empty bins were dropped and bins are contiguous.
    if how == "mean":
        sums = np.add.reduceat(np.where(finite, v, 0.0), s)
        with np.errstate(invalid="ignore", divide="ignore"):
            red = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    elif how == "min":
        red = np.fmin.reduceat(v, s)
    elif how == "max":
        red = np.fmax.reduceat(v, s)
    else:
        raise ValueError(f"bin_series: how must be mean, min or max, not {how!r}")
    red = np.where(counts > 0, red, np.nan)
    # the last non-empty bin's slice must stop at its own end, not at the end of the array
    last = np.flatnonzero(nonempty)[-1]
    if ends[last] < len(v):
        tail = v[starts[last]:ends[last]]
        ft = tail[np.isfinite(tail)]
        red[-1] = np.nan if not len(ft) else {"mean": np.mean, "min": np.min, "max": np.max}[how](ft)
    out[nonempty] = red
    return out
