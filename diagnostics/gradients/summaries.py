"""Means and medians of per-element GSNR, per parameter tensor and pooled: :class:`GSNRSummary`.

:func:`ratio_summaries` gives both of GSNR's summaries (the bias-corrected ratio and the raw one) from the
per-element means and variances. On the CPU they are taken with numpy over all tensors laid end to end
(segmented sums; exact medians by :func:`_median_np`); on another device (CUDA) with torch where the
moments are, so only the summaries, a few numbers per tensor, cross to the host (two transfers at most).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diagnostics.errors import DataError

__all__ = ["GSNRSummary", "gsnr_summary", "ratio_summaries", "summaries_of_ratios"]


@dataclass(frozen=True)
class GSNRSummary:
    """Mean and median of per-element GSNR, per parameter tensor and over all parameters (key ``"all"``).

    ``"all"`` pools every element of every tensor (a parameter-count-weighted aggregate). Both are taken
    over the values as given, negative corrected estimates included (no clipping).
    """

    mean: dict[str, float]
    median: dict[str, float]


def gsnr_summary(ratios: Mapping[str, Tensor]) -> GSNRSummary:
    """Summarise per-element GSNR (the output of :func:`gsnr`, :func:`gsnr_raw` or :func:`microbatch_gsnr`).

    The mean over elements of the corrected estimator is an unbiased-to-first-order estimate of the mean
    population GSNR; the median is a robust summary but not an unbiased estimate of the population median
    (the per-element noise widens the distribution).

    Returns:
        :class:`GSNRSummary` with ``mean`` and ``median`` dicts keyed by parameter name and ``"all"``
        (metrics ``gsnr_mean`` / ``gsnr_median``). Cost: one copy of all elements into one float64 array,
        one exact median per tensor and one over all of them: in numpy on the CPU, in torch on another
        device (the numbers to the host in one transfer).
    """
    if not ratios:
        raise DataError("gsnr_summary: no ratios given")
    pooled = torch.cat([v.detach().reshape(-1).to(torch.float64) for v in ratios.values()])
    names, sizes = list(ratios), [v.numel() for v in ratios.values()]
    if pooled.device.type != "cpu":
        return _device_flat_summary(names, sizes, pooled)
    return _flat_summary(names, sizes, pooled.numpy())


def ratio_summaries(names: list[str], sizes: list[int], m: Tensor, v: Tensor, n: int,
                    eps: float) -> tuple[GSNRSummary, GSNRSummary]:
    """The summaries of the corrected and the raw GSNR of N gradients with per-element means ``m`` and
    unbiased variances ``v`` (float64 ``[P]``, the tensors ``names`` of ``sizes`` laid end to end).

    Where no variance is floored (every ``s^2 >= eps N / (N - 1)``) the raw ratio is the increasing
    affine map ``N / (N - 1) * (corrected + 1 / N)`` of the corrected one, so its means and medians are
    the mapped means and medians; the tensors with a floored element (unused embedding rows, a bias
    whose gradient is structurally zero) are summarised from their raw ratios, and so is ``"all"``
    then (:func:`summaries_of_ratios`). Cost: a few passes over all elements at once, one median per
    tensor and one pooled, plus the floored tensors' and, if any, one more pooled median; on the CPU in
    numpy (no per-tensor tensor operation), elsewhere in torch on the moments' device (a few kernels per
    tensor, and the summaries' numbers to the host in one or two transfers).
    """
    if m.device.type != "cpu":
        return _device_summaries(names, sizes, m, v, n, eps)
    m_np, v_np = m.numpy(), v.numpy()
    if m_np.size <= _SMALL:
        small = _small_summaries(names, sizes, m_np, v_np, n, eps)
        if small is not None:
            return small
    live = _segments(names, sizes)
    # numpy rather than torch: half the time per pass at millions of elements, and less per call on
    # small models; a chunk at a time, so the passes over a chunk find it in the cache and the only arrays
    # as large as the model are the two this needs.
    size = m_np.size
    corrected_np, below = np.empty_like(m_np), np.empty(m_np.shape, dtype=bool)
    work = np.empty(min(size, _CHUNK), dtype=m_np.dtype)
    for lo in range(0, size, _CHUNK):
        hi = min(lo + _CHUNK, size)
        _corrected_chunk(m_np[lo:hi], v_np[lo:hi], n, eps, corrected_np[lo:hi], work[: hi - lo])
        np.less(v_np[lo:hi], eps * n / (n - 1), out=below[lo:hi])
    flags_np = np.logical_or.reduceat(below, [a for _, a, _ in live]).tolist() if live else []

    def raw_of_np(name: str, a: int, b: int, out: Any) -> None:
        raw_into(m_np[a:b], v_np[a:b], n, eps, out[a:b])

    return summaries_of_ratios(names, sizes, torch.from_numpy(corrected_np), flags_np, raw_of_np, n)


def _small_summaries(names: list[str], sizes: list[int], m: np.ndarray, v: np.ndarray, n: int,
                     eps: float) -> tuple[GSNRSummary, GSNRSummary] | None:
    """:func:`ratio_summaries` of a small model (at most :data:`_SMALL` values), or None when a ratio is not
    finite (then the general path, which says where the NaN is, takes over).

    Both ratios are formed for every element into one array, each tensor's segment of each is sorted in
    place, and the medians are read at the middle positions: on a model this small the cost is the number
    of numpy calls, not the arithmetic, and this takes about half as many as mapping the raw summaries
    from the corrected ones and selecting each median apart. Cost: two ratios per element, one sort per
    tensor and ratio, one segmented sum, one selection of both ratios' pooled values.
    """
    size = m.size
    starts, stops, odd, (lows_at, highs_at) = _small_layout(tuple(sizes))
    if size == 0 or not starts:
        return None
    both, work = np.empty(2 * size), np.empty(size)
    corrected, raw = both[:size], both[size:]  # the pooled selection reads both as two rows
    _corrected_chunk(m, v, n, eps, corrected, work)
    _raw_chunk(m, v, n, eps, raw, work)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.add.reduceat(both, starts).tolist()
    half = len(sums) // 2
    totals = (math.fsum(sums[:half]), math.fsum(sums[half:]))
    if not (math.isfinite(totals[0]) and math.isfinite(totals[1])):
        return None
    for a, b in zip(starts, stops, strict=True):
        both[a:b].sort()  # not partition at the middle: in the training loop, sorting these few values is faster
    lows, highs = both[lows_at].tolist(), both[highs_at].tolist()
    # Both ratios' pooled middles in one selection, on a copy (the segments stay apart).
    h = size // 2
    pooled = np.partition(both.reshape(2, size), h, axis=1)
    uppers = pooled[:, h].tolist()
    pooled_medians = uppers if size % 2 else [(a + b) / 2 for a, b in zip(pooled[:, :h].max(axis=1).tolist(), uppers,
                                                                          strict=True)]
    live = [name for name, k in zip(names, sizes, strict=True) if k]
    out = []
    for which in (0, 1):
        mean, median = dict.fromkeys(names, float("nan")), dict.fromkeys(names, float("nan"))
        for i, name in enumerate(live):
            j = which * half + i
            mean[name] = sums[j] / (stops[j] - starts[j])
            median[name] = highs[j] if odd[j] else (lows[j] + highs[j]) / 2
        mean["all"], median["all"] = totals[which] / size, pooled_medians[which]
        out.append(GSNRSummary(mean=mean, median=median))
    return out[0], out[1]


@functools.lru_cache(maxsize=64)
def _small_layout(sizes: tuple[int, ...]) -> tuple[list[int], list[int], list[bool], tuple[np.ndarray, np.ndarray]]:
    """For :func:`_small_summaries` of tensors of ``sizes`` laid end to end, twice (the corrected ratios,
    then the raw ones): each non-empty segment's start and stop, whether its count is odd, and the
    positions of its lower and upper middle values once sorted (equal for an odd count)."""
    ends = list(itertools.accumulate(sizes))
    size = ends[-1] if ends else 0
    once = [(end - k, end) for k, end in zip(sizes, ends, strict=True) if k]
    both = once + [(a + size, b + size) for a, b in once]
    lows = np.array([a + (b - a - 1) // 2 for a, b in both], dtype=np.intp)
    highs = np.array([a + (b - a) // 2 for a, b in both], dtype=np.intp)
    return [a for a, _ in both], [b for _, b in both], [(b - a) % 2 == 1 for a, b in both], (lows, highs)


def _corrected_chunk(m: np.ndarray, v: np.ndarray, n: int, eps: float, out: np.ndarray, work: np.ndarray) -> None:
    """The corrected ratio ``(m^2 - v / N) / max(v, eps)`` of one chunk into ``out`` (``work``: a temporary
    of the same size). The operations of :meth:`GradientMoments.gsnr` in its order, so both round alike."""
    np.multiply(m, m, out=out)
    np.multiply(v, 1.0 / n, out=work)
    out -= work
    np.maximum(v, eps, out=work)
    out /= work


def _raw_chunk(m: np.ndarray, v: np.ndarray, n: int, eps: float, out: np.ndarray, work: np.ndarray) -> None:
    """The raw ratio ``m^2 / max(v (N - 1) / N, eps)`` of one chunk into ``out`` (``work``: a temporary of the
    same size)."""
    np.square(m, out=out)
    np.multiply(v, (n - 1) / n, out=work)
    np.maximum(work, eps, out=work)
    out /= work


def corrected_into(m: Tensor, v: Tensor, n: int, eps: float, out: Tensor) -> None:
    """:func:`_corrected_chunk` in torch (float64 ``m``, ``v`` and ``out`` on one device), the same operations
    in the same order."""
    torch.mul(m, m, out=out)
    out.sub_(v * (1.0 / n)).div_(v.clamp_min(eps))


def raw_into(m: Any, v: Any, n: int, eps: float, out: Any) -> None:
    """The raw ratio ``m^2 / max(v (N - 1) / N, eps)`` of one tensor's float64 moments into ``out``: in torch
    for a tensor ``out``, else in numpy a chunk at a time (``m``, ``v`` numpy arrays or CPU tensors)."""
    if isinstance(out, Tensor):
        out.copy_(m.square().div_((v * ((n - 1) / n)).clamp_min(eps)))
        return
    m, v = np.asarray(m), np.asarray(v)
    work = np.empty(min(m.size, _CHUNK), dtype=np.float64)
    for lo in range(0, m.size, _CHUNK):
        hi = min(lo + _CHUNK, m.size)
        with np.errstate(over="ignore"):  # float32 ``out``: a ratio beyond its range is inf, as documented
            _raw_chunk(m[lo:hi], v[lo:hi], n, eps, out[lo:hi], work[: hi - lo])


def _device_summaries(names: list[str], sizes: list[int], m: Tensor, v: Tensor, n: int,
                      eps: float) -> tuple[GSNRSummary, GSNRSummary]:
    """:func:`ratio_summaries` in torch on the moments' device (:func:`_device_flat_summary`): two
    transfers to the host, four when a variance is floored."""
    corrected = torch.empty_like(m)
    corrected_into(m, v, n, eps, corrected)  # the numpy path's operations in its order: both round alike
    live = _segments(names, sizes)
    floored = v < eps * n / (n - 1)
    flags = torch.stack([floored[a:b].any() for _, a, b in live]).tolist() if live else []

    def raw_of(name: str, a: int, b: int, out: Any) -> None:
        raw_into(m[a:b], v[a:b], n, eps, out[a:b])

    return summaries_of_ratios(names, sizes, corrected, flags, raw_of, n, in_torch=True)


RawOf = Callable[[str, int, int, Any], None]


def summaries_of_ratios(names: list[str], sizes: list[int], corrected: Tensor, floored: list[bool],
                        raw_of: RawOf, n: int, in_torch: bool | None = None) -> tuple[GSNRSummary, GSNRSummary]:
    """Both summaries from the corrected ratios laid end to end (float64 or float32 ``[P]``, overwritten and,
    on the CPU, reordered within each tensor's segment; sums are taken in float64 either way), whether each
    non-empty tensor has a floored variance (``floored``, in order), and ``raw_of(name, a, b, pooled)``,
    which writes the raw ratios of the tensor at ``[a, b)`` into ``pooled[a:b]`` (a numpy array on the
    CPU, a tensor elsewhere; ``in_torch``: a tensor on the CPU too). The raw ratios of unfloored tensors
    are mapped from the corrected ones (:func:`ratio_summaries`); ``"all"`` too when no tensor is floored.
    Cost: see :func:`ratio_summaries`.
    """
    device = corrected.device.type != "cpu" if in_torch is None else in_torch
    values = corrected if device else corrected.numpy()
    first = (_device_flat_summary if device else _flat_summary)(names, sizes, values)
    mean = {k: _to_raw(x, n) for k, x in first.mean.items()}
    median = {k: _to_raw(x, n) for k, x in first.median.items()}
    live = _segments(names, sizes)
    redo = [(name, a, b) for (name, a, b), flag in zip(live, floored, strict=True) if flag]
    if not redo:
        return first, GSNRSummary(mean=mean, median=median)
    if device:  # the corrected summary is already taken: mapped to raw in place
        pooled = corrected.mul_(n / (n - 1)).add_(1.0 / (n - 1))
        for name, a, b in redo:
            raw_of(name, a, b, pooled)
        rows = _segment_stats(pooled, [(a, b) for _, a, b in redo] + [(0, pooled.numel())]).tolist()
        for (name, a, b), row in zip(redo, rows, strict=False):
            mean[name], median[name] = _mean_and_median(row, b - a)
        mean["all"], median["all"] = _mean_and_median(rows[-1], pooled.numel())
        return first, GSNRSummary(mean=mean, median=median)
    pooled = values
    for lo in range(0, pooled.size, _CHUNK):
        c = pooled[lo : lo + _CHUNK]
        c *= n / (n - 1)
        c += 1.0 / (n - 1)
    for name, a, b in redo:
        # The raw ratio itself, in its place in the pooled values (the other segments hold their tensors'
        # values in another order: the pooled mean and median do not depend on it).
        raw_of(name, a, b, pooled)
        mean[name] = float(pooled[a:b].mean(dtype=np.float64))
        median[name] = _median_np(pooled[a:b], in_place=True)
    mean["all"], median["all"] = float(pooled.mean(dtype=np.float64)), _median_np(pooled, in_place=True)
    return first, GSNRSummary(mean=mean, median=median)


def _to_raw(corrected_value: Any, n: int) -> Any:
    """The raw ratio of an element (or a mean or median) whose variance is not floored: an increasing affine
    map of the corrected one."""
    return corrected_value * (n / (n - 1)) + 1.0 / (n - 1)


def _segment_stats(values: Tensor, bounds: list[tuple[int, int]]) -> Tensor:
    """``[S, 4]`` float64 on ``values``' device, one row per segment ``(a, b)`` (non-empty): its sum, its
    two middle values (equal for an odd count) and whether it holds a NaN. A few kernels per segment, no
    host synchronisation."""
    rows = []
    f64 = torch.float64  # float32 values (a large model's ratios) are summed in float64 too
    for a, b in bounds:
        seg = values[a:b]
        k = b - a
        upper = torch.kthvalue(seg, k // 2 + 1).values
        lower = upper if k % 2 else torch.kthvalue(seg, k // 2).values
        rows.append(torch.stack([seg.sum(dtype=f64), lower.to(f64), upper.to(f64), seg.isnan().any().to(f64)]))
    return torch.stack(rows)


def _mean_and_median(row: list[float], size: int) -> tuple[float, float]:
    """(mean, median) of a segment of ``size`` values from its :func:`_segment_stats` row."""
    total, lower, upper, has_nan = row
    median = float("nan") if has_nan else upper if lower == upper else (lower + upper) / 2
    return total / size, median


def _device_flat_summary(names: list[str], sizes: list[int], values: Tensor) -> GSNRSummary:
    """:func:`_flat_summary` in torch on ``values``' device (means to the rounding of another summation
    order, medians exact): a few kernels per tensor and one transfer to the host."""
    live = _segments(names, sizes)
    out = GSNRSummary(mean=dict.fromkeys([*names, "all"], float("nan")),
                      median=dict.fromkeys([*names, "all"], float("nan")))
    if values.numel() == 0:
        return out
    rows = _segment_stats(values, [(a, b) for _, a, b in live] + [(0, values.numel())]).tolist()
    for (name, a, b), row in zip(live, rows, strict=False):
        out.mean[name], out.median[name] = _mean_and_median(row, b - a)
    out.mean["all"], out.median["all"] = _mean_and_median(rows[-1], values.numel())
    return out


#: Values per chunk of the passes over millions of values: their temporaries stay in the cache and are not
#: mapped afresh at every call (at GPT-2 small's size a whole-array temporary is 1 GB).
_CHUNK = 1 << 18

#: Models with at most this many values are summarised by :func:`_small_summaries`.
_SMALL = 1 << 15

#: Arrays of at least this many values have their middle found by :func:`_bracketed_middle`.
_BRACKETED_SELECTION_MIN = 1 << 16


def _median_np(a: np.ndarray, nan_free: bool = False, in_place: bool = False) -> float:
    """The median of a 1-D array, the average of the two middle values for an even count; NaN if any
    (``nan_free``: the caller knows there is none, and the check is skipped). Exact. ``in_place``: ``a``
    may be reordered (no copy is selected in).

    Below :data:`_BRACKETED_SELECTION_MIN` values: one introselect of a copy at the upper middle and the
    maximum of the half below it (about 5x faster than ``np.median``, which selects both middle values at
    once: benchmarks/RESULTS.md, "GSNR's medians"). From there, :func:`_bracketed_middle`: three
    comparisons per value instead of a copy and an introselect of all of them.
    """
    k = a.size
    if k == 0:
        return float("nan")
    if not nan_free and k >= _BRACKETED_SELECTION_MIN and _has_nan(a):
        return float("nan")
    middle = _bracketed_middle(a) if k >= _BRACKETED_SELECTION_MIN else None
    if middle is not None:
        return middle
    h = k // 2
    part = a if in_place else a.copy()
    part.partition(h)
    if not nan_free and np.isnan(part[h:].max()):  # NaN sorts last, so any NaN is in the upper half
        return float("nan")
    return float(part[h]) if k % 2 else (float(part[:h].max()) + float(part[h])) / 2


def _bracketed_middle(a: np.ndarray) -> float | None:
    """The median of ``a`` (1-D, no NaN) by sampled bracketing (Floyd & Rivest 1975), or None when the
    bracket missed (then the caller selects in full).

    Two values ``lo <= hi`` are read off a random sample so that the middle of ``a`` most likely lies
    between them; one pass counts the ``L`` values below ``lo`` and gathers the ``M`` values in
    ``[lo, hi]``. When ``L <= h - 1`` and ``L + M > h`` (``h = k // 2``), the middle values of ``a`` are
    the middle values of that small set shifted by ``L``, whatever the sample was: the result is exact,
    and only the speed depends on the draw (a private generator, fixed seed). Cost: a sample of about
    ``k^(2/3)`` values and three comparisons per value.
    """
    k = a.size
    h = k // 2
    s = int(k ** (2 / 3))
    sample = a[np.random.default_rng(0).integers(0, k, s)]
    at = h * s / k
    spread = 3.0 * math.sqrt(s)  # about 6 standard deviations of a rank in the sample
    ranks = [max(0, int(at - spread)), min(s - 1, int(at + spread) + 1)]
    sample.partition(ranks)
    lo, hi = sample[ranks[0]], sample[ranks[1]]
    below, kept = 0, []
    inside, upto = np.empty(min(k, _CHUNK), dtype=bool), np.empty(min(k, _CHUNK), dtype=bool)
    for start in range(0, k, _CHUNK):
        part = a[start : start + _CHUNK]
        at_least, at_most = inside[: part.size], upto[: part.size]
        np.greater_equal(part, lo, out=at_least)
        below += part.size - int(np.count_nonzero(at_least))
        np.less_equal(part, hi, out=at_most)
        at_least &= at_most
        kept.append(part[at_least])
    near = kept[0] if len(kept) == 1 else np.concatenate(kept)
    first = h - 1 if k % 2 == 0 else h  # the lowest rank needed
    if below > first or below + near.size <= h:
        return None
    near.partition(h - below)
    upper = float(near[h - below])
    # For an even count below <= h - 1, so the value before the middle is in ``near`` too.
    return upper if k % 2 else (float(near[: h - below].max()) + upper) / 2


def _has_nan(a: np.ndarray) -> bool:
    """Whether ``a`` (1-D) holds a NaN, a chunk at a time (no temporary as large as ``a``)."""
    return any(np.isnan(a[lo : lo + _CHUNK]).any() for lo in range(0, a.size, _CHUNK))


def _median(x: Tensor) -> float:
    """:func:`_median_np` of a tensor's elements (on the CPU; float64 unless float32)."""
    x = x.detach().reshape(-1).cpu()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float64)
    return _median_np(x.numpy())


def _segments(names: list[str], sizes: list[int]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` of each non-empty tensor laid end to end in the order of ``names``."""
    stops = itertools.accumulate(sizes)  # not np.cumsum: a list to an array costs more than the sums here
    return [(name, stop - size, stop) for name, size, stop in zip(names, sizes, stops, strict=True) if size]


def _flat_summary(names: list[str], sizes: list[int], values: np.ndarray) -> GSNRSummary:
    """:class:`GSNRSummary` of tensors laid end to end in ``values`` (float64 or float32), in the order of
    ``names``. The medians are selected in ``values`` itself: each tensor's values stay in its segment, in
    another order.

    The means come from one segmented sum, and a NaN anywhere is looked for once: on a small model the
    per-tensor calls, not the arithmetic, are the cost."""
    live = _segments(names, sizes)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a sum is that mean's NaN, not an error
        if values.dtype == np.float64:
            sums = np.add.reduceat(values, [a for _, a, _ in live]) if live else np.zeros(0)
        else:  # float32 ratios: summed in float64, one tensor at a time (reduceat casts an element at a time)
            sums = np.array([np.add.reduce(values[a:b], dtype=np.float64) for _, a, b in live], dtype=np.float64)
        total = float(sums.sum()) if sums.size else float("nan")
    nan_free = bool(np.isfinite(total)) or not _has_nan(values)
    mean = dict.fromkeys(names, float("nan"))  # empty tensors keep NaN
    median = dict.fromkeys(names, float("nan"))
    for (name, a, b), segment_sum in zip(live, sums.tolist(), strict=True):
        mean[name] = segment_sum / (b - a)
        median[name] = _median_np(values[a:b], nan_free, in_place=True)
    mean["all"] = total / values.size if values.size else float("nan")
    median["all"] = _median_np(values, nan_free)  # on a copy: selecting in place would mix the segments
    return GSNRSummary(mean=mean, median=median)
