"""GSNR's summaries on another device (torch where the moments are) against the numpy ones on the CPU.

The device path is plain torch, so it runs here on CPU tensors; with CUDA the last test runs it there."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.gradients import gradient_moments
from diagnostics.gradients.summaries import (
    GSNRSummary,
    _device_flat_summary,
    _device_summaries,
    _flat_summary,
    ratio_summaries,
)


def _same(got: GSNRSummary, want: GSNRSummary, abs_: float = 1e-300) -> None:
    """Means to the rounding of another summation order; medians to the last bit or two (the same selections
    of values computed by the same operations, which a fused multiply-add may round differently). ``abs_``:
    for raw ratios, which one path maps from the corrected ones and the other forms directly."""
    assert got.mean.keys() == want.mean.keys() and got.median.keys() == want.median.keys()
    for k in want.mean:
        g, w = got.mean[k], want.mean[k]
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-12, abs=abs_), (k, g, w)
        g, w = got.median[k], want.median[k]
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-14, abs=abs_), (k, g, w)


#: The raw ratio mapped from the corrected one, N/(N-1) (corrected + 1/N), loses the digits the sum cancels
#: where the raw ratio is small: about 1e-16 of 1/(N-1) absolute. The device path maps; the numpy path of a
#: small model forms the raw ratios directly.
_MAPPED_RAW_ABS = 1e-14


def _moments_case(n: int, sizes: list[int], zero: list[bool], seed: int):
    gen = torch.Generator().manual_seed(seed)
    per_sample = {}
    for i, size in enumerate(sizes):
        g = torch.randn(n, size, generator=gen, dtype=torch.float64) + 0.3
        if zero[i]:
            g[:, : max(1, size // 3)] = 0.0  # structurally zero gradient: floored variance
            g[:, -1] = 0.5  # the same gradient for every sample: zero variance, non-zero mean
        per_sample[f"p{i}"] = g
    moments = gradient_moments(per_sample)
    names = list(moments.mean)
    m = torch.cat([moments.mean[k].reshape(-1) for k in names])
    v = torch.cat([moments.var[k].reshape(-1) for k in names])
    return moments, names, [moments.mean[k].numel() for k in names], m, v


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       zero=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_device_summaries_equal_the_numpy_ones(n, sizes, zero, seed):
    """Both summaries, with and without floored variances, odd and even sizes."""
    moments, names, sizes_, m, v = _moments_case(n, sizes, zero, seed)
    want = ratio_summaries(names, sizes_, m, v, n, 1e-20)
    got = _device_summaries(names, sizes_, m, v, n, 1e-20)
    _same(got[0], want[0])
    _same(got[1], want[1], _MAPPED_RAW_ABS)
    assert want == moments.summaries()


def test_device_summary_with_nan_inf_and_empty_tensors_equals_the_numpy_one():
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(k, generator=g, dtype=torch.float64) for k in (9, 12, 301))
    a[3] = float("nan")
    b[0], b[1] = float("inf"), float("-inf")
    names, sizes = ["a", "b", "empty", "c"], [9, 12, 0, 301]
    values = torch.cat([a, b, c])
    want = _flat_summary(names, sizes, values.numpy())
    _same(_device_flat_summary(names, sizes, values), want)
    assert math.isnan(want.median["a"]) and math.isnan(want.mean["empty"])
    a[3] = 0.0
    values = torch.cat([a, b, c])
    _same(_device_flat_summary(names, sizes, values), _flat_summary(names, sizes, values.numpy()))


def test_device_summaries_of_nothing_are_nan():
    empty = torch.zeros(0, dtype=torch.float64)
    first, raw = _device_summaries(["w"], [0], empty, empty, 4, 1e-20)
    assert all(math.isnan(x) for x in [*first.mean.values(), *raw.median.values()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_summaries_of_cuda_moments_are_taken_there_and_equal_the_cpu_ones():
    moments, names, sizes, m, v = _moments_case(8, [5000, 33, 70_000], [True, False, True], seed=0)
    want = ratio_summaries(names, sizes, m, v, 8, 1e-20)
    got = ratio_summaries(names, sizes, m.cuda(), v.cuda(), 8, 1e-20)
    _same(got[0], want[0])
    _same(got[1], want[1], _MAPPED_RAW_ABS)
    assert np.isfinite(got[0].median["all"])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       zero=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1),
       chunk=st.integers(1, 9), small=st.booleans())
def test_the_summaries_equal_numpys_means_and_medians(n, sizes, zero, seed, chunk, small):
    """The means and medians numpy gives for the ratios themselves: by the small-model path (both ratios
    formed and each segment sorted), or by the general one with the chunk and the bracketing threshold
    lowered, so that every pass runs over several chunks and every median is bracketed."""
    import diagnostics.gradients.summaries as summaries_mod

    moments, names, sizes_, m, v = _moments_case(n, sizes, zero, seed)
    saved = summaries_mod._CHUNK, summaries_mod._BRACKETED_SELECTION_MIN, summaries_mod._SMALL
    if not small:
        summaries_mod._CHUNK, summaries_mod._BRACKETED_SELECTION_MIN, summaries_mod._SMALL = chunk, 1, 0
    try:
        got = ratio_summaries(names, sizes_, m, v, n, 1e-20)
    finally:
        summaries_mod._CHUNK, summaries_mod._BRACKETED_SELECTION_MIN, summaries_mod._SMALL = saved
    for summary, ratios in zip(got, (moments.gsnr(), moments.gsnr_raw()), strict=True):
        pooled = np.concatenate([r.reshape(-1).numpy() for r in ratios.values()])
        want = {k: r.reshape(-1).numpy() for k, r in ratios.items()} | {"all": pooled}
        for k, values in want.items():
            assert summary.mean[k] == pytest.approx(float(np.mean(values)), rel=1e-12, abs=1e-12), k
            assert summary.median[k] == pytest.approx(float(np.median(values)), rel=1e-12, abs=1e-12), k


def _general_summaries(names, sizes, m, v, n):  # noqa: ANN001, ANN202
    """:func:`ratio_summaries` by its general path (the small-model path switched off)."""
    import diagnostics.gradients.summaries as summaries_mod

    saved, summaries_mod._SMALL = summaries_mod._SMALL, 0
    try:
        return ratio_summaries(names, sizes, m, v, n, 1e-20)
    finally:
        summaries_mod._SMALL = saved


def test_the_small_path_hands_non_finite_ratios_to_the_general_one():
    """A NaN mean makes that tensor's summaries and the pooled ones NaN, as on the general path; an empty
    tensor's are NaN too."""
    import diagnostics.gradients.summaries as summaries_mod

    moments, names, sizes, m, v = _moments_case(4, [7, 12], [False, False], seed=3)
    m[2] = float("nan")
    names, sizes = [*names, "empty"], [*sizes, 0]
    got = ratio_summaries(names, sizes, m, v, 4, 1e-20)
    want = _general_summaries(names, sizes, m, v, 4)
    assert summaries_mod._small_summaries(names, sizes, m.numpy(), v.numpy(), 4, 1e-20) is None
    for a, b in zip(got, want, strict=True):
        _same(a, b)
        assert math.isnan(a.median["p0"]) and math.isnan(a.median["all"]) and math.isnan(a.mean["empty"])
        assert math.isfinite(a.median["p1"])


def test_the_small_path_equals_the_general_one_with_an_empty_tensor_and_odd_and_even_sizes():
    import diagnostics.gradients.summaries as summaries_mod

    moments, names, sizes, m, v = _moments_case(6, [1, 2, 9, 40], [True, False, True, False], seed=4)
    names, sizes = [names[0], "empty", *names[1:]], [sizes[0], 0, *sizes[1:]]
    got = summaries_mod._small_summaries(names, sizes, m.numpy(), v.numpy(), 6, 1e-20)
    assert got is not None
    want = _general_summaries(names, sizes, m, v, 6)
    _same(got[0], want[0])
    _same(got[1], want[1], _MAPPED_RAW_ABS)
    assert math.isnan(got[0].mean["empty"]) and math.isnan(got[1].median["empty"])


def test_a_digits_sized_model_takes_the_small_path_and_a_larger_one_the_general(monkeypatch):
    """The digits MLP's 3,466 values go through the small-model path (its GSNR cost depends on it); a model
    above the size limit through the general one."""
    import diagnostics.gradients.summaries as summaries_mod

    calls = []
    real = summaries_mod._small_summaries
    monkeypatch.setattr(summaries_mod, "_small_summaries", lambda *a: calls.append(a[1]) or real(*a))
    for sizes in ([2048, 32, 1024, 32, 320, 10], [summaries_mod._SMALL + 1]):
        g = torch.Generator().manual_seed(0)
        m = torch.randn(sum(sizes), generator=g, dtype=torch.float64)
        v = torch.rand(sum(sizes), generator=g, dtype=torch.float64)
        ratio_summaries([f"p{i}" for i in range(len(sizes))], sizes, m, v, 8, 1e-20)
    assert calls == [[2048, 32, 1024, 32, 320, 10]]
