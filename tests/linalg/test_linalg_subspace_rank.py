import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_cases import assert_rng_unchanged, rng_snapshot

from diagnostics.errors import ConfigError, DataError
from diagnostics.linalg import (
    alpha_req,
    as_operator,
    effective_rank,
    nuclear_norm,
    power_iteration,
    principal_angles,
    singular_values,
    stable_rank,
    subspace_fraction,
    subspace_overlap,
    top_singular_vector,
)


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 4), q=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_principal_angles_match_scipy(p, q, seed):
    rng = np.random.default_rng(seed)
    U, V = rng.standard_normal((12, p)), rng.standard_normal((12, q))
    ours = principal_angles(torch.tensor(U), torch.tensor(V)).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(U, V))
    np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_principal_angles_small_angles_accurate():
    U = torch.eye(5, dtype=torch.float64)[:, :2]
    V = U.clone()
    V[2, 0] = 1e-10
    angles = principal_angles(U, V)
    np.testing.assert_allclose(angles, [0.0, 1e-10], rtol=1e-6, atol=1e-15)


def test_subspace_overlap_and_fraction():
    rng = np.random.default_rng(0)
    U = torch.tensor(rng.standard_normal((30, 3)))
    assert subspace_overlap(U, U @ torch.tensor(rng.standard_normal((3, 3)))) == pytest.approx(1.0)
    W = torch.tensor(rng.standard_normal((30, 3)))
    cos2 = np.cos(principal_angles(U, W).numpy()) ** 2
    assert subspace_overlap(U, W) == pytest.approx(cos2.mean())
    Q = torch.linalg.qr(U).Q
    g = Q @ torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64) + torch.linalg.qr(W - Q @ (Q.T @ W)).Q[:, 0] * 3
    assert subspace_fraction(g, Q) == pytest.approx(5.0 / 14.0)
    assert subspace_fraction(torch.zeros(30), Q) == 0.0
    with pytest.raises(ConfigError, match="rows"):
        subspace_overlap(U, torch.ones(5, 2))


@pytest.mark.parametrize(("sigma", "expected"), [([3.0, 2.0, 1.0, 0.0], 2.7495), ([1.0], 1.0)])
def test_effective_rank_goldens(sigma, expected):
    assert effective_rank(torch.tensor(sigma)) == pytest.approx(expected, abs=1e-4)


def test_effective_rank_identity_and_rank_one():
    for n in (1, 4, 17):
        assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-9)
    rng = np.random.default_rng(1)
    R1 = torch.tensor(np.outer(rng.standard_normal(20), rng.standard_normal(8)))
    assert effective_rank(R1) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_effective_rank_covariance_variant():
    # Columns with standard deviations 1/i: sigma variant over 1/i, covariance variant over 1/i^2.
    rng = np.random.default_rng(2)
    D = 30
    X = rng.standard_normal((4000, D)) / np.arange(1, D + 1)
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    p = s**2 / (s**2).sum()
    expected = np.exp(-(p * np.log(p)).sum())
    assert effective_rank(torch.tensor(X), variant="covariance") == pytest.approx(expected, rel=1e-6)
    assert effective_rank(torch.tensor(X)) > 1.5 * effective_rank(torch.tensor(X), variant="covariance")
    with pytest.raises(ConfigError, match="variant"):
        effective_rank(torch.eye(2), variant="entropy")


def test_stable_rank_and_nuclear_norm():
    W = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    assert stable_rank(W) == pytest.approx(25.0 / 16.0)
    assert nuclear_norm(W) == pytest.approx(7.0)
    assert stable_rank(torch.eye(6)) == pytest.approx(6.0)
    with pytest.raises(ConfigError, match="2-D"):
        stable_rank(torch.ones(3, 2, 2))
    # From its singular values (any order), as from the matrix: one SVD can serve both ranks.
    s = singular_values(W)
    assert s.dtype == torch.float64 and s.tolist() == pytest.approx([4.0, 3.0])
    assert stable_rank(s.flip(0)) == stable_rank(W) and effective_rank(s) == effective_rank(W)
    with pytest.raises(DataError, match="non-negative"):
        stable_rank(torch.tensor([1.0, -0.5]))
    with pytest.raises(DataError, match="non-finite"):
        nuclear_norm(torch.tensor([[float("nan")]]))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_power_law(alpha):
    D = 150
    rng = np.random.default_rng(3)
    Qx, _ = np.linalg.qr(rng.standard_normal((D, D)))
    # Exact covariance spectrum i^-alpha via a centred design with orthogonal columns.
    H = scipy.linalg.hadamard(256)[:, 1 : D + 1] / np.sqrt(255)
    X = (H * np.arange(1, D + 1) ** (-alpha / 2)) @ Qx.T
    fit = alpha_req(torch.tensor(X))
    assert fit.ok and fit.reason is None
    assert fit.alpha == pytest.approx(alpha, rel=1e-6) and float(fit) == fit.alpha
    assert (fit.first, fit.last, fit.num_ranks) == (11, 75, 65)  # half of min(N - 1, D) = 150
    assert (fit.num_samples, fit.num_features) == (256, 150) and fit.r2 == pytest.approx(1.0)
    full = alpha_req(torch.tensor(X), last=150, edge_fraction=1.0)
    assert (full.first, full.last) == (11, 150) and full.alpha == pytest.approx(alpha, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_finite_sample_gaussian_features(alpha):
    """N Gaussian samples with covariance spectrum i^-alpha in a random basis: within 5% when N = 32 D."""
    D, N = 96, 32 * 96
    gen = torch.Generator().manual_seed(int(10 * alpha))
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    scale = torch.arange(1, D + 1, dtype=torch.float64) ** (-alpha / 2)
    X = (torch.randn(N, D, generator=gen, dtype=torch.float64) * scale) @ Q.T
    fit = alpha_req(X)
    assert (fit.first, fit.last) == (11, 48)
    assert fit.alpha == pytest.approx(alpha, rel=0.05)
    # N comparable to D: still a number (above the minimum), but biased upwards, most for flat spectra
    small = alpha_req(X[: 2 * D])
    assert small.ok and small.alpha > fit.alpha


def test_alpha_req_is_nan_with_a_reason_below_the_minimum():
    gen = torch.Generator().manual_seed(0)
    few_features = alpha_req(torch.randn(500, 59, generator=gen))  # half of 59 = 29: ranks 11..29, 19 < 20
    assert math.isnan(few_features.alpha) and not few_features.ok
    assert "fewer than min_ranks = 20" in few_features.reason and "[500, 59]" in few_features.reason
    assert alpha_req(torch.randn(500, 60, generator=gen)).ok  # 11..30: exactly 20 ranks
    few_samples = alpha_req(torch.randn(40, 200, generator=gen))
    assert math.isnan(few_samples.alpha) and "min(N-1, D) = 39" in few_samples.reason
    dead = torch.randn(500, 200, generator=gen)
    dead[:, 25:] = 0.0  # 25 live features: a rank-deficient covariance
    fit = alpha_req(dead)
    assert math.isnan(fit.alpha) and "positive eigenvalues" in fit.reason and fit.num_positive == 25
    assert alpha_req(torch.randn(500, 60, generator=gen), min_ranks=30).reason is not None
    zero = alpha_req(torch.zeros(100, 100))
    assert math.isnan(zero.alpha) and zero.num_positive == 0
    with pytest.raises(ConfigError, match="first"):
        alpha_req(torch.ones(4, 4), first=10, last=5)
    with pytest.raises(ConfigError, match="edge_fraction"):
        alpha_req(torch.ones(4, 4), edge_fraction=0.0)


def test_power_iteration_matches_svd_and_aligns_sign():
    rng = np.random.default_rng(4)
    W = torch.tensor(rng.standard_normal((40, 25)))
    U, S, Vh = torch.linalg.svd(W)
    before = rng_snapshot()
    sigma, u, v, it = top_singular_vector(W, iters=2000, tol=1e-13)
    assert_rng_unchanged(before)
    assert sigma == pytest.approx(float(S[0]), rel=1e-10)
    assert abs(float(v @ Vh[0])) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(W @ v, sigma * u, atol=1e-5)
    # Warm start from the negated answer: the sign follows v0, and convergence is immediate.
    sigma2, u2, v2, it2 = power_iteration(W, v0=-v, tol=1e-8)
    assert it2 <= 3 and float(v2 @ v) < 0
    assert sigma2 == pytest.approx(sigma, rel=1e-9)


def test_as_operator_errors():
    with pytest.raises(ConfigError, match="LinearOperator"):
        as_operator([[1.0]])
