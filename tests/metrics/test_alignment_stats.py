import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.errors import ConfigError
from diagnostics.metrics.alignment_stats import (
    NUM_BINS,
    QUANTILES,
    alignment_cosines,
    alignment_statistics,
)


def _svd_cosines(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Reference: full SVD in float64, v1 = first right singular vector, explicit loop per token.
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    v1 = vh[0]
    return torch.stack([torch.dot(xi.double(), v1) / xi.double().norm() for xi in x]), v1


def test_cosines_match_direct_svd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 7, generator=g, dtype=torch.float64)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    ref, v1 = _svd_cosines(x, w)
    got = alignment_cosines(x, v1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_output_side_sign_agrees_with_input_side():
    # u1^T W x = sigma1 v1^T x: the sign of the output projection equals the sign of the input cosine.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = alignment_cosines(x, vh[0])
    out_proj = (x @ w.T) @ u[:, 0]
    assert torch.equal(torch.sign(a), torch.sign(out_proj))


def test_unnormalised_v1_and_batch_dims():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 6, generator=g)
    v = torch.randn(6, generator=g)
    a = alignment_cosines(x, 5.0 * v)
    b = alignment_cosines(x.reshape(12, 6), v)
    assert a.shape == (12,)
    torch.testing.assert_close(a, b)
    assert a.abs().max() <= 1.0


def test_zero_rows_give_zero_cosine():
    x = torch.zeros(4, 3)
    x[0] = torch.tensor([1.0, 0.0, 0.0])
    a = alignment_cosines(x, torch.tensor([1.0, 0.0, 0.0]))
    assert a.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_shape_mismatch_raises():
    with pytest.raises(ConfigError, match="input features"):
        alignment_cosines(torch.randn(5, 4), torch.randn(3))
    with pytest.raises(ConfigError, match="1-D"):
        alignment_cosines(torch.randn(5, 4), torch.randn(4, 1))
    with pytest.raises(ConfigError, match="zero norm"):
        alignment_cosines(torch.randn(5, 4), torch.zeros(4))


def test_statistics_known_values():
    a = torch.tensor([-0.9, -0.15, 0.2, 0.3, 0.5, 1.0, 0.05, 0.6])
    st = alignment_statistics(a)
    assert st["positive_fraction"] == pytest.approx(6 / 8)
    assert st["sign_diversity"] == pytest.approx(1 - abs(2 * 6 / 8 - 1))
    assert st["mean"] == pytest.approx(float(a.double().mean()))
    assert st["mean_abs"] == pytest.approx(float(a.double().abs().mean()))
    assert st["quantiles"] == pytest.approx(
        torch.quantile(a.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    )
    h = st["histogram"]
    assert len(h) == NUM_BINS and sum(h) == pytest.approx(1.0)
    # -0.9 -> bin 1; 1.0 -> last bin; 0.05 -> bin 10; -0.15 -> bin 8.
    assert h[1] == pytest.approx(1 / 8) and h[19] == pytest.approx(1 / 8)
    assert h[8] == pytest.approx(1 / 8) and h[10] == pytest.approx(1 / 8)
    assert st["num_tokens"] == 8


def test_histogram_matches_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1000, generator=g) * 2 - 1
    counts, _ = np.histogram(a.double().numpy(), bins=NUM_BINS, range=(-1.0, 1.0))
    assert alignment_statistics(a)["histogram"] == pytest.approx((counts / 1000).tolist())


def test_collapsed_and_balanced():
    assert alignment_statistics(torch.full((10,), 0.4))["sign_diversity"] == 0.0
    assert alignment_statistics(torch.tensor([0.3, -0.3] * 5))["sign_diversity"] == 1.0
    assert alignment_statistics(torch.zeros(5))["sign_diversity"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_diversity_invariant_to_global_sign_of_v1(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g) + 0.7 * torch.randn(8, generator=g)  # biased: p+ != 1/2
    x[3] = 0.0  # a zero token must not break the symmetry
    v = torch.randn(8, generator=g)
    s_pos = alignment_statistics(alignment_cosines(x, v))
    s_neg = alignment_statistics(alignment_cosines(x, -v))
    assert s_pos["sign_diversity"] == pytest.approx(s_neg["sign_diversity"])
    assert s_pos["mean_abs"] == pytest.approx(s_neg["mean_abs"])
    assert s_pos["mean"] == pytest.approx(-s_neg["mean"])


def test_histogram_mirrors_under_sign_flip_without_edge_values():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(200, generator=g, dtype=torch.float64) * 1.98 - 0.99
    a = a[(a * 10).frac().abs() > 1e-9]  # avoid exact bin edges, where floor() is not symmetric
    h = alignment_statistics(a)["histogram"]
    h_neg = alignment_statistics(-a)["histogram"]
    assert h == pytest.approx(h_neg[::-1])


def test_empty_raises():
    with pytest.raises(ConfigError, match="empty"):
        alignment_statistics(torch.empty(0))


def _reference_row(row):
    """One distribution's statistics, element by element in float64 (numpy's quantile and histogram)."""
    import numpy as np

    a = np.array([0.0 if not np.isfinite(x) else min(max(x, -1.0), 1.0) for x in row.tolist()])
    pos, neg = float(np.sum(a > 0)) / a.size, float(np.sum(a < 0)) / a.size
    hist = np.histogram(a, bins=NUM_BINS, range=(-1.0, 1.0))[0] / a.size
    return {
        "positive_fraction": pos,
        "sign_diversity": 1.0 - abs(pos - neg) / (pos + neg) if pos + neg > 0 else 1.0,
        "mean": float(a.mean()),
        "mean_abs": float(np.abs(a).mean()),
        "quantiles": np.quantile(a, QUANTILES).tolist(),
        "histogram": hist.tolist(),
    }


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 40),
    st.data(),
)
def test_batched_statistics_equal_a_row_by_row_reference(m, t, data):
    from diagnostics.metrics.alignment_stats import batched_alignment_statistics

    values = st.one_of(
        st.floats(-1.5, 1.5, width=32),
        st.sampled_from([0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), -float("inf")]),
    )
    cos = torch.tensor(data.draw(st.lists(st.lists(values, min_size=t, max_size=t), min_size=m, max_size=m)))
    got = batched_alignment_statistics(cos, detail=True)
    for i in range(m):
        ref = _reference_row(cos[i])
        assert got["num_tokens"][i] == t
        for key, value in ref.items():
            assert got[key][i] == pytest.approx(value, abs=1e-12), key
