"""GSNRReduction: the summaries and noise parts of GradientMoments, fed one parameter at a time."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.errors import DataError
from diagnostics.gradients import gradient_moments
from diagnostics.gradients.ratio_reduction import GSNRReduction, ratio_dtype


@pytest.fixture(autouse=True, scope="module")
def _general_summaries():
    """The moments' summaries by their general path, which maps the raw ratios from the corrected ones as
    the reduction does: the two are compared bit for bit (a small model's moments take another path,
    tested against the general one in test_gradients_summaries.py)."""
    import diagnostics.gradients.summaries as summaries_mod

    saved, summaries_mod._SMALL = summaries_mod._SMALL, 0
    yield
    summaries_mod._SMALL = saved


def _per_sample(n: int, shapes: list[tuple[int, ...]], floored: list[bool], seed: int,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, shape in enumerate(shapes):
        g = (torch.randn(n, *shape, generator=gen, dtype=torch.float64) + 0.3).to(dtype)
        flat = g.view(n, -1)
        if floored[i] and flat.shape[1]:
            flat[:, : max(1, flat.shape[1] // 3)] = 0.0  # structurally zero: floored variance
            flat[:, -1] = 0.5  # the same for every sample: zero variance, non-zero mean
        out[f"p{i}"] = g
    return out


def _identical(got, want) -> None:  # noqa: ANN001
    """The same summaries, number for number, NaN where NaN (an empty tensor's)."""
    for a, b in zip(got, want, strict=True):
        for stat in ("mean", "median"):
            x, y = getattr(a, stat), getattr(b, stat)
            assert x.keys() == y.keys()
            assert all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in y), (stat, x, y)


def _reduced(per_sample: dict[str, torch.Tensor], zero: set[str] = frozenset()) -> GSNRReduction:
    n = next(iter(per_sample.values())).shape[0]
    red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], n, "cpu")
    for k, g in reversed(per_sample.items()):  # any order
        if k in zero:
            red.zero(k)
        else:
            red.add(k, g)
    return red


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9),
       shapes=st.lists(st.sampled_from([(1,), (7,), (3, 4), (0,), (40,), (2, 3, 5)]), min_size=1, max_size=4),
       floored=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1),
       chunk_bytes=st.sampled_from([8, 64, 8 << 20]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_summaries_are_those_of_the_moments_to_the_last_bit(n, shapes, floored, seed, chunk_bytes, dtype):
    """Floored and unfloored tensors, empty ones, float32 and float64 gradients, the moments a few columns
    at a time or all at once: the same summaries as GradientMoments', exactly; the noise parts to the
    rounding of another summation order."""
    import diagnostics.gradients.stats as stats_mod

    per_sample = _per_sample(n, shapes, floored, seed, dtype)
    saved = stats_mod._MOMENT_CHUNK_BYTES
    stats_mod._MOMENT_CHUNK_BYTES = {"cpu": chunk_bytes, "cuda": chunk_bytes}
    try:
        want = gradient_moments(per_sample)
        red = _reduced(per_sample)
    finally:
        stats_mod._MOMENT_CHUNK_BYTES = saved
    got = red.summaries()
    _identical(got, want.summaries())
    assert red.summaries() is got  # kept: the ratios were overwritten by the raw ones
    parts, want_parts = red.noise_parts(), want.noise_parts()
    assert parts.trace == pytest.approx(want_parts.trace, rel=1e-12, abs=1e-12)
    assert parts.sqnorm == pytest.approx(want_parts.sqnorm, rel=1e-10, abs=1e-10)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9),
       shapes=st.lists(st.sampled_from([(1,), (7,), (3, 4), (0,), (40,), (2, 3, 5)]), min_size=1, max_size=4),
       floored=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1),
       in_torch=st.booleans())
def test_ratios_kept_in_float32_summarise_as_the_float64_ones_rounded(n, shapes, floored, seed, in_torch):
    """Kept in float32, each corrected ratio is the float64 one rounded: the corrected medians are exactly
    the medians of the rounded float64 ratios, and every summary is within float32 rounding of the float64
    one, relative to the largest ratio of its tensor (the corrected one's too for the raw summaries, which
    are an affine map of the corrected ones where no variance is floored)."""
    import numpy as np

    per_sample = _per_sample(n, shapes, floored, seed, torch.float32)
    want = gradient_moments(per_sample)
    red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], n, "cpu", dtype=torch.float32)
    for k, g in per_sample.items():
        red.add(k, g)
    assert red.corrected.dtype == torch.float32
    red._in_torch = in_torch
    got = red.summaries()
    ratios = [want.gsnr(), want.gsnr_raw()]
    for which, (a, b) in enumerate(zip(got, want.summaries(), strict=True)):
        pooled = [torch.cat([r.reshape(-1) for r in kind.values()]) for kind in ratios]
        for k in b.mean:
            values = pooled[which] if k == "all" else ratios[which][k].reshape(-1)
            if values.numel() == 0:
                assert math.isnan(a.mean[k]) and math.isnan(a.median[k])
                continue
            corrected = pooled[0] if k == "all" else ratios[0][k].reshape(-1)
            scale = max(float(values.abs().max()), float(corrected.abs().max()))
            for stat in ("mean", "median"):
                x, y = getattr(a, stat)[k], getattr(b, stat)[k]
                assert abs(x - y) <= 3e-7 * scale + 1e-300, (which, stat, k, x, y)
            if which == 0:
                rounded = values.to(torch.float32).numpy().astype(np.float64)
                assert a.median[k] == float(np.median(rounded)), (k, a.median[k])


def test_a_ratio_beyond_float32s_range_reads_as_inf_when_kept_in_float32():
    """A mean gradient of 1e10 with no variance: a ratio of 1e40 in float64, inf in float32 (as documented)."""
    per_sample = {"w": torch.full((4, 3), 1e10), "b": torch.randn(4, 2, generator=torch.Generator().manual_seed(0))}
    kept = {}
    for dtype in (torch.float64, torch.float32):
        red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], 4, "cpu", dtype=dtype)
        for k, g in per_sample.items():
            red.add(k, g)
        kept[dtype] = red.summaries()[0]
    assert kept[torch.float64].median["w"] == pytest.approx(1e40, rel=1e-6)
    assert kept[torch.float32].median["w"] == math.inf
    assert kept[torch.float32].median["b"] == pytest.approx(kept[torch.float64].median["b"], rel=1e-6)


def test_ratio_dtype_is_float32_unless_a_gradient_is_float64():
    assert ratio_dtype([torch.float32, torch.float32]) == torch.float32
    assert ratio_dtype([torch.bfloat16]) == torch.float32
    assert ratio_dtype([torch.float32, torch.float64]) == torch.float64
    with pytest.raises(DataError, match="torch.float32 or torch.float64, not torch.float16"):
        GSNRReduction([("w", torch.Size([2]))], 2, "cpu", dtype=torch.float16)


def test_a_parameter_no_sample_reached_reads_as_zero_gradients():
    per_sample = _per_sample(4, [(6,), (3, 2)], [False, False], seed=1, dtype=torch.float64)
    zeroed = dict(per_sample, p1=torch.zeros(4, 3, 2, dtype=torch.float64))
    _identical(_reduced(per_sample, zero={"p1"}).summaries(), gradient_moments(zeroed).summaries())


def test_the_torch_path_equals_the_numpy_one():
    """What runs on a CUDA device (torch where the ratios are), here on CPU tensors."""
    per_sample = _per_sample(5, [(30,), (4, 4), (9,)], [True, False, True], seed=2, dtype=torch.float32)
    want = _reduced(per_sample).summaries()
    red = _reduced(per_sample)
    red._in_torch = True
    got = red.summaries()
    for a, b in zip(got, want, strict=True):
        for k in b.mean:
            assert a.mean[k] == pytest.approx(b.mean[k], rel=1e-12)
            assert a.median[k] == pytest.approx(b.median[k], rel=1e-14)
    assert math.isfinite(got[1].median["all"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_ratios_stay_there_and_equal_the_cpu_ones():
    per_sample = _per_sample(8, [(5000,), (33,), (70_000,)], [True, False, True], seed=0, dtype=torch.float32)
    want = _reduced(per_sample)
    red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], 8, "cuda")
    for k, g in per_sample.items():
        red.add(k, g.cuda())
    assert red.corrected.is_cuda
    for a, b in zip(red.summaries(), want.summaries(), strict=True):
        for k in b.mean:
            assert a.mean[k] == pytest.approx(b.mean[k], rel=1e-12)
            assert a.median[k] == pytest.approx(b.median[k], rel=1e-14)


def test_misfed_reductions_say_what_is_wrong():
    per_sample = _per_sample(3, [(4,), (2,)], [False, False], seed=3, dtype=torch.float64)
    red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], 3, "cpu")
    with pytest.raises(DataError, match="'nope' is not in the layout"):
        red.add("nope", per_sample["p0"])
    with pytest.raises(DataError, match=r"takes \[3, ...\] gradients of 4 elements"):
        red.add("p0", per_sample["p1"])
    red = GSNRReduction([(k, g.shape[1:]) for k, g in per_sample.items()], 3, "cpu")
    red.add("p0", per_sample["p0"])
    with pytest.raises(DataError, match="'p0' was fed twice"):
        red.add("p0", per_sample["p0"])
    with pytest.raises(DataError, match=r"no gradients were given for \['p1'\]"):
        red.summaries()
    red.add("p1", per_sample["p1"])
    with pytest.raises(DataError, match="taken with eps=1e-20, not 0.001"):
        red.summaries(1e-3)
    red.summaries()
    with pytest.raises(DataError, match="fed after its summaries were read"):
        red.zero("p1")
    with pytest.raises(DataError, match="N >= 2"):
        GSNRReduction([("w", torch.Size([2]))], 1, "cpu")
