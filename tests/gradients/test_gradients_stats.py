"""GSNR (corrected and raw), its summary, the gradient noise scale and its parts against brute force and
closed forms: per-sample loops, Monte Carlo against the Gaussian expectations, property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from diagnostics.errors import ConfigError, DataError
from diagnostics.gradients import (
    GSNR_EPS,
    NoiseScaleEMA,
    NoiseScaleParts,
    gradient_moments,
    gradient_noise_parts,
    gradient_noise_scale,
    gsnr,
    gsnr_raw,
    gsnr_summary,
    microbatch_gsnr,
    noise_scale_parts,
    per_sample_gradients,
)
from tests.cases import get_case


def _per_sample() -> dict[str, torch.Tensor]:
    c = get_case("mlp")
    x = torch.cat([b[0] for b in c.batches])
    y = torch.cat([b[1] for b in c.batches])
    return per_sample_gradients(c.model, c.loss_fn, (x, y))


def _loop_gsnr(ps: dict[str, torch.Tensor], corrected: bool) -> dict[str, np.ndarray]:
    """Element by element, sample by sample, in Python floats."""
    out = {}
    for name, g in ps.items():
        flat = g.reshape(g.shape[0], -1).double().numpy()
        n = flat.shape[0]
        vals = []
        for j in range(flat.shape[1]):
            col = [float(flat[i, j]) for i in range(n)]
            m = sum(col) / n
            ss = sum((c - m) ** 2 for c in col)
            if corrected:
                s2 = ss / (n - 1)
                vals.append((m * m - s2 / n) / max(s2, GSNR_EPS))
            else:
                vals.append(m * m / max(ss / n, GSNR_EPS))
        out[name] = np.array(vals).reshape(g.shape[1:])
    return out


@pytest.mark.parametrize("corrected", [True, False])
def test_gsnr_equals_per_sample_loop(corrected: bool) -> None:
    ps = _per_sample()
    got = (gsnr if corrected else gsnr_raw)(ps)
    ref = _loop_gsnr(ps, corrected)
    for n in ps:
        assert got[n].shape == ps[n].shape[1:] and got[n].dtype == torch.float64
        np.testing.assert_allclose(got[n].numpy(), ref[n], rtol=1e-10, atol=1e-300)


def test_gsnr_edge_cases() -> None:
    g = {"w": torch.tensor([[0.0, 2.0, 1.0, 1.0], [0.0, 2.0, 3.0, -1.0]])}
    r, raw = gsnr(g)["w"], gsnr_raw(g)["w"]
    assert r[0] == 0 and raw[0] == 0  # zero mean, zero variance
    assert r[1] == 4.0 / GSNR_EPS and raw[1] == 4.0 / GSNR_EPS  # constant gradient: variance floored at eps
    assert r[2] == pytest.approx((4.0 - 2.0 / 2) / 2.0) and raw[2] == pytest.approx(4.0)
    assert r[3] == pytest.approx(-0.5) and raw[3] == 0.0  # no signal: the corrected estimate may be negative
    for fn in (gsnr, gsnr_raw):
        with pytest.raises(DataError, match="at least 2"):
            fn({"w": torch.ones(1, 3)})
        with pytest.raises(DataError):
            fn({})


def test_zero_signal_reads_about_zero_corrected_and_one_over_n_minus_3_raw() -> None:
    """Gaussian gradients, mu = 0, N = 16: E[raw] = 1/(N-3) = 0.077, E[corrected] = 2/(N(N-3)) = 0.0096."""
    n, elements = 16, 400_000
    g = torch.randn(n, elements, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw = float(gsnr_raw({"w": g})["w"].mean())
    cor = float(gsnr({"w": g})["w"].mean())
    # standard errors: about 0.115 / sqrt(elements) for the corrected, N/(N-1) of that for the raw
    assert raw == pytest.approx(1 / (n - 3), abs=1.5e-3)
    assert cor == pytest.approx(2 / (n * (n - 3)), abs=1.5e-3)


@pytest.mark.parametrize("snr,n", [(1.0, 32), (0.1, 16), (4.0, 64)])
def test_corrected_gsnr_matches_the_gaussian_expectation(snr: float, n: int) -> None:
    """E[r] = snr (N-1)/(N-3) + 2/(N(N-3)) for Gaussian gradients (the docstring's closed form)."""
    elements = 200_000
    gen = torch.Generator().manual_seed(1)
    g = math.sqrt(snr) + torch.randn(n, elements, generator=gen, dtype=torch.float64)
    r = gsnr({"w": g})["w"]
    expected = snr * (n - 1) / (n - 3) + 2 / (n * (n - 3))
    stderr = float(r.std()) / math.sqrt(elements)
    assert float(r.mean()) == pytest.approx(expected, abs=4 * stderr)
    raw = gsnr_raw({"w": g})["w"]
    assert float(raw.mean()) == pytest.approx((snr + 1 / n) * n / (n - 3), abs=4 * stderr * n / (n - 1))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 9), st.integers(1, 5)),
              elements=st.floats(-1e3, 1e3, allow_nan=False, width=64)),
       st.floats(0.01, 100.0), st.randoms(use_true_random=False))
def test_gsnr_properties(x: np.ndarray, scale: float, rnd) -> None:
    g = torch.tensor(x)
    n = g.shape[0]
    r = gsnr({"w": g})["w"]
    raw = gsnr_raw({"w": g})["w"]
    var = g.var(0, unbiased=True)
    ok = var > 1e-6 * (1 + g.abs().max(0).values ** 2)  # away from the eps floor
    # an affine function of the raw ratio, bounded below by -1/N
    torch.testing.assert_close(raw[ok], n / (n - 1) * (r[ok] + 1 / n), rtol=1e-9, atol=1e-9)
    assert bool((r[ok] >= -1 / n - 1e-12).all()) and bool((raw >= 0).all())
    # invariant to the order of the samples, to a common scale and to a sign flip
    perm = list(range(n))
    rnd.shuffle(perm)
    torch.testing.assert_close(gsnr({"w": g[perm]})["w"][ok], r[ok], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gsnr({"w": -scale * g})["w"][ok], r[ok], rtol=1e-7, atol=1e-9)


def test_gsnr_summary() -> None:
    ratios = {"a": torch.tensor([1.0, 2.0, 10.0, 3.0]), "b": torch.tensor([[5.0], [7.0], [-0.5]])}
    s = gsnr_summary(ratios)
    assert s.mean == pytest.approx({"a": 4.0, "b": 11.5 / 3, "all": 27.5 / 7})
    assert s.median == pytest.approx({"a": 2.5, "b": 5.0, "all": 3.0})  # negative values kept, not clipped


# --- gradient noise scale ------------------------------------------------------------------------------------
def _loop_parts(ps: dict[str, torch.Tensor]) -> tuple[float, float]:
    rows = [np.concatenate([g[i].reshape(-1).double().numpy() for g in ps.values()])
            for i in range(next(iter(ps.values())).shape[0])]
    n = len(rows)
    mean = sum(rows) / n
    trace = sum(float(((r - mean) ** 2).sum()) for r in rows) / (n - 1)
    return trace, float((mean**2).sum()) - trace / n


def test_gradient_noise_parts_and_scale_equal_loops() -> None:
    ps = _per_sample()
    trace, g2 = _loop_parts(ps)
    parts = gradient_noise_parts(ps)
    assert parts.trace == pytest.approx(trace, rel=1e-12) and parts.sqnorm == pytest.approx(g2, rel=1e-10)
    expected = trace / g2 if g2 > 0 else math.inf
    assert gradient_noise_scale(ps) == pytest.approx(expected, rel=1e-10)
    assert gradient_noise_scale(ps, bias_corrected=False) == pytest.approx(trace / (g2 + trace / 8), rel=1e-10)
    # the same as McCandlish's two-batch-size form with B_small = 1, B_big = N
    flat = torch.cat([g.reshape(8, -1).double() for g in ps.values()], 1)
    two = noise_scale_parts(float(flat.square().sum(1).mean()), float(flat.mean(0).square().sum()), 1, 8)
    assert two.trace == pytest.approx(trace, rel=1e-10) and two.sqnorm == pytest.approx(g2, rel=1e-9)


def test_gradient_noise_scale_pure_noise_is_infinite() -> None:
    g = {"w": torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])}
    assert gradient_noise_scale(g) == math.inf
    assert gradient_noise_parts(g).sqnorm < 0


def test_noise_scale_parts_are_unbiased_for_two_batch_sizes() -> None:
    """Monte Carlo: g_i ~ N(G, diag(sigma^2)); the parts average to |G|^2 and tr(Sigma)."""
    gen = torch.Generator().manual_seed(3)
    d, trials, b_small, b_big = 50, 4000, 4, 32
    G = torch.randn(d, generator=gen, dtype=torch.float64) * 0.3
    sigma = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    samples = G + sigma * torch.randn(trials, b_big, d, generator=gen, dtype=torch.float64)
    small = samples[:, :b_small].mean(1).square().sum(1)
    big = samples.mean(1).square().sum(1)
    parts = [noise_scale_parts(float(s), float(b), b_small, b_big) for s, b in zip(small, big)]
    tr = np.array([p.trace for p in parts])
    g2 = np.array([p.sqnorm for p in parts])
    true_tr, true_g2 = float(sigma.square().sum()), float(G.square().sum())
    assert tr.mean() == pytest.approx(true_tr, abs=4 * tr.std() / math.sqrt(trials))
    assert g2.mean() == pytest.approx(true_g2, abs=4 * g2.std() / math.sqrt(trials))
    with pytest.raises(ConfigError):
        noise_scale_parts(1.0, 1.0, 8, 8)


def test_noise_scale_ema_is_a_debiased_running_average_of_each_part() -> None:
    rng = np.random.default_rng(0)
    xs = [NoiseScaleParts(float(a), float(b)) for a, b in zip(rng.uniform(5, 10, 20), rng.normal(1, 2, 20))]
    ema = NoiseScaleEMA(decay=0.8)
    assert ema.value() == NoiseScaleParts(0.0, 0.0)
    for k, p in enumerate(xs, start=1):
        got = ema.update(p)
        w = np.array([0.2 * 0.8 ** (k - j) for j in range(1, k + 1)])
        w /= w.sum()
        assert got.trace == pytest.approx(float(w @ [q.trace for q in xs[:k]]), rel=1e-12)
        assert got.sqnorm == pytest.approx(float(w @ [q.sqnorm for q in xs[:k]]), rel=1e-9, abs=1e-12)
        assert got.b_simple == (got.trace / got.sqnorm if got.sqnorm > 0 else math.inf)
    resumed = NoiseScaleEMA(decay=0.8, state=dict(ema.state))
    assert resumed.value() == ema.value()
    assert resumed.update(xs[0]) == ema.update(xs[0])
    with pytest.raises(ConfigError):
        NoiseScaleEMA(decay=1.0)
    with pytest.raises(DataError):
        ema.update(NoiseScaleParts(math.nan, 1.0))


# --- micro-batches ----------------------------------------------------------------------------------------
def test_microbatch_gsnr_is_gsnr_over_microbatch_means() -> None:
    ps = _per_sample()  # 8 samples -> 4 micro-batches of 2
    micro = [{n: g[2 * m : 2 * m + 2].mean(0) for n, g in ps.items()} for m in range(4)]
    stacked = {n: torch.stack([mb[n] for mb in micro]) for n in ps}
    got, ref = microbatch_gsnr(micro), _loop_gsnr(stacked, corrected=True)
    plain = microbatch_gsnr(micro, gaussian=False)
    raw, ref_raw = microbatch_gsnr(micro, corrected=False), _loop_gsnr(stacked, corrected=False)
    for n in ps:
        np.testing.assert_allclose(got[n].numpy(), ref[n] * (4 - 3) / (4 - 1), rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(plain[n].numpy(), ref[n], rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(raw[n].numpy(), ref_raw[n], rtol=1e-10, atol=1e-300)
    with pytest.raises(DataError, match="at least 2"):
        microbatch_gsnr(micro[:1], gaussian=False)
    with pytest.raises(DataError, match="at least 4"):
        microbatch_gsnr(micro[:3])


def test_microbatch_gsnr_estimates_b_times_the_per_sample_gsnr() -> None:
    """Gaussian samples, per-sample GSNR 0.05; micro-batches of b = 8: about 8 x 0.05 with the Gaussian
    correction at M = 64 and at M = 8 (averaged over many elements), (M-1)/(M-3) times that without."""
    gen = torch.Generator().manual_seed(5)
    b, m, elements, snr = 8, 64, 20_000, 0.05
    g = math.sqrt(snr) + torch.randn(m * b, elements, generator=gen, dtype=torch.float64)
    micro = [{"w": g[i * b : (i + 1) * b].mean(0)} for i in range(m)]
    per_sample = float(gsnr({"w": g})["w"].mean())
    ratio = float(microbatch_gsnr(micro)["w"].mean()) / per_sample
    assert per_sample == pytest.approx(snr * 511 / 509 + 2 / (512 * 509), rel=0.05)
    assert ratio / b == pytest.approx(1.0, rel=0.06)
    plain = float(microbatch_gsnr(micro, gaussian=False)["w"].mean()) / per_sample
    assert plain / b == pytest.approx((m - 1) / (m - 3), rel=0.06)  # the ratio bias at N = M
    few = [{"w": g[i * b : (i + 1) * b].mean(0)} for i in range(8)]
    assert float(microbatch_gsnr(few)["w"].mean()) / per_sample / b == pytest.approx(1.0, rel=0.15)


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_median_is_numpys_with_ties_and_even_counts(values: list[int]) -> None:
    from diagnostics.gradients.summaries import _median

    assert _median(torch.tensor(values, dtype=torch.float64)) == float(np.median(values))


def test_gradient_moments_serve_gsnr_and_noise_parts_from_one_pass() -> None:
    from diagnostics.gradients import gradient_moments

    g = {"w": torch.randn(6, 4, 3, dtype=torch.float64), "b": torch.randn(6, 3, dtype=torch.float64)}
    moments = gradient_moments(g)
    flat = torch.cat([t.reshape(6, -1) for t in g.values()], 1)
    assert moments.n == 6
    torch.testing.assert_close(moments.var["w"], g["w"].var(0, correction=1))
    torch.testing.assert_close(moments.mean["b"], g["b"].mean(0))
    parts = moments.noise_parts()
    trace = float(flat.var(0, correction=1).sum())
    assert math.isclose(parts.trace, trace, rel_tol=1e-12)
    assert math.isclose(parts.sqnorm, float(flat.mean(0).square().sum()) - trace / 6, rel_tol=1e-12)
    # float32 gradients: the statistics agree with float64 ones to float32 accuracy
    g32 = {k: v.float() for k, v in g.items()}
    for k, v in gradient_moments(g32).gsnr().items():
        torch.testing.assert_close(v, moments.gsnr()[k], rtol=1e-4, atol=1e-6)


def test_median_of_large_inputs_is_numpys() -> None:
    from diagnostics.gradients.summaries import _median

    x = torch.randn(10_000, dtype=torch.float64)
    assert _median(x) == float(np.median(x.numpy()))
    assert _median(x[:9_999]) == float(torch.kthvalue(x[:9_999], 5_000).values)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 9), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       zero=st.lists(st.booleans(), min_size=4, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_both_summaries_match_the_direct_ones(n, sizes, zero, seed):
    """The raw summary mapped from the corrected one equals the one computed from the raw ratios, with and
    without floored variances (constant elements: zero, or a constant non-zero gradient)."""
    gen = torch.Generator().manual_seed(seed)
    per_sample = {}
    for i, size in enumerate(sizes):
        g = torch.randn(n, size, generator=gen, dtype=torch.float64) + 0.3
        if zero[i]:
            g[:, : max(1, size // 3)] = 0.0  # structurally zero gradient
            g[:, -1] = 0.5  # the same gradient for every sample: zero variance, non-zero mean
        per_sample[f"p{i}"] = g
    moments = gradient_moments(per_sample)
    corrected, raw = moments.summaries()
    want_c, want_r = gsnr_summary(moments.gsnr()), gsnr_summary(moments.gsnr_raw())
    for got, want in ((corrected, want_c), (raw, want_r)):
        assert got.mean.keys() == want.mean.keys() and got.median.keys() == want.median.keys()
        for k in want.mean:
            assert got.mean[k] == pytest.approx(want.mean[k], rel=1e-12, abs=1e-12), k
            assert got.median[k] == pytest.approx(want.median[k], rel=1e-12, abs=1e-12), k


@pytest.mark.parametrize("k", [4096, 4097, 10_000, 10_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_of_large_tensors_equals_numpys(k, dtype):
    from diagnostics.gradients.summaries import _median

    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    x[:7] = x[7]  # ties at the middle are possible in real ratios
    x[-3:] = float("inf")
    assert _median(x) == pytest.approx(float(np.median(x.numpy())), rel=1e-6)
    x[k // 3] = float("nan")
    assert math.isnan(_median(x))


def test_gsnr_summary_matches_numpy_per_tensor_and_pooled():
    g = torch.Generator().manual_seed(3)
    ratios = {"a": torch.randn(7, generator=g, dtype=torch.float64), "b": torch.randn(4, 6, generator=g),
              "c": torch.randn(5000, generator=g, dtype=torch.float64)}
    got = gsnr_summary(ratios)
    pooled = np.concatenate([r.double().reshape(-1).numpy() for r in ratios.values()])
    for k, r in ratios.items():
        assert got.mean[k] == pytest.approx(float(np.mean(r.double().numpy())), rel=1e-12)
        assert got.median[k] == pytest.approx(float(np.median(r.double().numpy())), rel=1e-12)
    assert got.mean["all"] == pytest.approx(float(pooled.mean()), rel=1e-12)
    assert got.median["all"] == pytest.approx(float(np.median(pooled)), rel=1e-12)


def test_gsnr_summary_with_nan_inf_and_empty_tensors_matches_numpy():
    """The segmented means and the one NaN check: a NaN in one tensor makes that tensor's and the pooled
    mean and median NaN and leaves the others exact; +inf and -inf together (a NaN sum, no NaN value)
    still give the other statistics; an empty tensor gives NaN."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(n, generator=g, dtype=torch.float64) for n in (9, 12, 301))
    a[3] = float("nan")
    b[0], b[1] = float("inf"), float("-inf")
    ratios = {"a": a, "b": b, "empty": torch.zeros(0, dtype=torch.float64), "c": c}
    got = gsnr_summary(ratios)
    assert math.isnan(got.mean["a"]) and math.isnan(got.median["a"])
    assert math.isnan(got.mean["all"]) and math.isnan(got.median["all"])
    assert math.isnan(got.mean["empty"]) and math.isnan(got.median["empty"])
    assert math.isnan(got.mean["b"]) and got.median["b"] == pytest.approx(float(np.median(b.numpy())), rel=1e-12)
    assert got.mean["c"] == pytest.approx(float(c.mean()), rel=1e-12)
    assert got.median["c"] == pytest.approx(float(np.median(c.numpy())), rel=1e-12)
    a[3] = 0.0  # no NaN left: b's infinities make the sum NaN, yet the medians are finite
    got = gsnr_summary(ratios)
    assert got.median["all"] == pytest.approx(float(np.median(torch.cat([a, b, c]).numpy())), rel=1e-12)
    assert got.median["a"] == pytest.approx(float(np.median(a.numpy())), rel=1e-12)


def _numpy_median(a: np.ndarray) -> float:
    return float(np.median(a))


@settings(max_examples=200, deadline=None)
@given(values=arrays(np.float64, st.integers(1, 60),
                     elements=st.one_of(st.integers(-3, 3).map(float),
                                        st.floats(allow_nan=False, allow_infinity=True, width=64))))
def test_bracketed_median_is_exact_whatever_the_sample(values):
    """Sampled bracketing on small arrays (its threshold lowered): ties, infinities, any order; the result
    equals numpy's median whether the bracket held the middle or missed (then the full selection runs)."""
    import diagnostics.gradients.summaries as summaries_mod

    saved = summaries_mod._BRACKETED_SELECTION_MIN
    summaries_mod._BRACKETED_SELECTION_MIN = 1
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            got, want = summaries_mod._median_np(values), _numpy_median(values)
        bracketed = summaries_mod._bracketed_middle(values)
    finally:
        summaries_mod._BRACKETED_SELECTION_MIN = saved
    assert got == want or (math.isnan(got) and math.isnan(want))
    assert bracketed is None or bracketed == want or (math.isnan(bracketed) and math.isnan(want))


@pytest.mark.parametrize("k", [65_536, 65_537, 200_001])
@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "constant", "infinities", "skewed"])
def test_median_of_large_arrays_is_numpys_exactly(k, kind):
    rng = np.random.default_rng(k)
    a = {"normal": lambda: rng.standard_normal(k),
         "ties": lambda: rng.integers(-2, 3, k).astype(np.float64),
         "sorted": lambda: np.sort(rng.standard_normal(k)),
         "constant": lambda: np.full(k, 0.25),
         "infinities": lambda: np.where(rng.random(k) < 0.4, np.inf, rng.standard_normal(k)),
         "skewed": lambda: rng.lognormal(0.0, 4.0, k)}[kind]()
    from diagnostics.gradients.summaries import _median_np

    assert _median_np(a) == _numpy_median(a)
    assert _median_np(a, nan_free=True) == _numpy_median(a)
    a[k // 3] = np.nan
    assert math.isnan(_median_np(a))


def test_a_bracket_that_misses_falls_back_to_the_full_selection(monkeypatch):
    """A sample that holds only the array's smallest values brackets nothing near the middle: None, and the
    median is still exact."""
    import diagnostics.gradients.summaries as summaries_mod

    a = np.random.default_rng(1).standard_normal(100_000)
    smallest = int(np.argmin(a))

    class _LowSample:
        def integers(self, low, high, size):
            return np.full(size, smallest)

    monkeypatch.setattr(summaries_mod.np.random, "default_rng", lambda seed: _LowSample())
    assert summaries_mod._bracketed_middle(a) is None
    assert summaries_mod._median_np(a) == _numpy_median(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 1000), (5, 33, 31), (3, 4096)])
def test_moments_a_chunk_at_a_time_equal_the_whole(monkeypatch, dtype, shape):
    """Centred a column chunk at a time (the chunk lowered to 100 columns, which divides none of these
    sizes): the same means and variances as in one piece, to the rounding of the reduction order (values of
    order 1, so the tolerance is a few units of it); the flat form too."""
    import diagnostics.gradients.stats as stats_mod

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    whole = stats_mod._moments(g)
    itemsize = torch.finfo(dtype).bits // 8
    monkeypatch.setattr(stats_mod, "_MOMENT_CHUNK_BYTES", {"cpu": 100 * shape[0] * itemsize})
    chunked = stats_mod._moments(g)
    assert chunked[2] == whole[2] == shape[0]
    for got, want in zip(chunked[:2], whole[:2], strict=True):
        assert got.shape == want.shape == g.shape[1:] and got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=8 * torch.finfo(dtype).eps, atol=8 * torch.finfo(dtype).eps)
    flat = stats_mod.GradientMoments.from_flat(g.reshape(shape[0], -1), [("p", torch.Size(g.shape[1:]))])
    tol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(flat.mean["p"], whole[0], rtol=tol, atol=tol)
    torch.testing.assert_close(flat.var["p"], whole[1], rtol=tol, atol=tol)
    # against float64 numpy: the mean and the unbiased variance themselves
    ref = g.double().reshape(shape[0], -1).numpy()
    np.testing.assert_allclose(chunked[0].reshape(-1).numpy(), ref.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked[1].reshape(-1).numpy(), ref.var(0, ddof=1), rtol=1e-5, atol=1e-7)
