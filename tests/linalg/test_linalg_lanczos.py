import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from linalg_cases import assert_rng_unchanged, network_like, rng_snapshot, wishart, with_spectrum

from diagnostics.errors import ConfigError
from diagnostics.linalg import DenseOperator, EigenResult, ScaledOperator, lanczos
from diagnostics.linalg.lanczos import _lanczos


def _reference(A, k, which):
    ev = torch.linalg.eigvalsh(A)
    top, bottom = ev.flip(0)[:k], ev[:k]
    return {"LA": top, "SA": bottom, "both": torch.cat([top, bottom])}[which]


def _check_pairs(A, res, rtol=1e-8):
    """Values match eigvalsh; residuals reported equal ||A y - theta y||; vectors orthonormal."""
    Y = res.eigenvectors.to(torch.float64)
    true_res = (A @ Y - Y * res.eigenvalues).norm(dim=0)
    # The basis is orthonormal to about tau m (tau = 1.5e-10 for float64 here), so a Ritz vector's true
    # residual can differ from ||E s|| by about that times ||A||; the rounding of the check itself is far below.
    np.testing.assert_allclose(res.residuals, true_res, rtol=1e-3, atol=1e-9 * float(A.norm()))
    assert torch.allclose(Y.T @ Y, torch.eye(Y.shape[1], dtype=torch.float64), atol=1e-9)


MATRICES = {
    "diagonal": lambda: torch.diag(torch.linspace(-3.0, 7.0, 150, dtype=torch.float64) ** 3),
    "wishart": lambda: wishart(150, 300, seed=1),
    "repeated": lambda: with_spectrum([4.0, 4.0, 4.0] + list(np.linspace(-1, 2.5, 117)) + [-3.0, -3.0, -3.0]),
    "negative": lambda: with_spectrum(np.concatenate([-np.linspace(5, 1, 40), np.linspace(0, 1, 80)]), seed=2),
    "network": lambda: network_like(200, seed=3),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("which", ["LA", "SA", "both"])
def test_extreme_eigenvalues_match_eigvalsh(name, which):
    A = MATRICES[name]()
    k = 3
    res = lanczos(A, k=k, which=which, tol=1e-10)
    assert isinstance(res, EigenResult)
    assert res.all_converged, res.settings
    ref = _reference(A, k, which)
    scale = float(torch.linalg.eigvalsh(A).abs().max())
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-8, atol=1e-8 * scale)
    _check_pairs(A, res)
    assert res.eigenvalues.dtype == torch.float64 and res.converged.dtype == torch.bool


def test_residuals_are_honest_when_not_converged():
    A = wishart(200, 220, seed=4)
    res = lanczos(A, k=5, tol=1e-12, max_matvecs=12)
    assert res.num_matvecs <= 12 and not res.all_converged
    assert res.settings["stop"] == "max_matvecs"
    Y = res.eigenvectors
    true_res = (A @ Y - Y * res.eigenvalues).norm(dim=0)
    np.testing.assert_allclose(res.residuals, true_res, rtol=1e-6)
    # Flags say exactly what the tolerance says.
    assert torch.equal(res.converged, res.residuals <= 1e-12 * res.eigenvalues.abs())


def test_budget_by_time_stops_with_converged_false():
    A = wishart(300, 310, seed=5)
    res = lanczos(A, k=10, tol=1e-14, max_seconds=0.0)
    assert not res.all_converged and res.settings["stop"] == "max_seconds"


def test_no_ghost_copies_of_a_converged_eigenvalue():
    # A well separated top eigenvalue converges within a few steps; many more steps without
    # reorthogonalisation then create spurious copies of it (Paige 1971). The result must hold it once.
    rng = np.random.default_rng(0)
    d = torch.tensor(np.concatenate([[100.0], rng.uniform(0.0, 1.0, 399)]))
    A = torch.diag(d)
    ref = torch.sort(d, descending=True).values[:5]
    res = lanczos(A, k=5, tol=1e-14, max_steps=200, max_matvecs=150)
    assert res.num_matvecs == 150
    assert int((res.eigenvalues > 50).sum()) == 1
    np.testing.assert_allclose(res.eigenvalues[0], 100.0, rtol=1e-12)
    assert float((res.eigenvalues[1:] - ref[1:]).abs().max()) < 0.05
    # The same run without reorthogonalisation shows the ghosts this test is there to catch.
    plain = _lanczos(A, 5, "LA", 1e-14, 200, None, 0, False, 150, None, full_reorth=False)
    assert int((plain.eigenvalues > 50).sum()) > 1


def test_warm_start_cuts_matvecs():
    A = network_like(400, seed=6)
    first = lanczos(A, k=10, tol=1e-8)
    rng = np.random.default_rng(1)
    E = torch.tensor(rng.standard_normal((400, 400)))
    A2 = A + 1e-3 * (E + E.T) / 40
    cold = lanczos(A2, k=10, tol=1e-8)
    block = lanczos(A2, k=10, tol=1e-8, v0=first.eigenvectors)
    single = lanczos(A2, k=10, tol=1e-8, v0=first.eigenvectors[:, 0])
    assert cold.all_converged and block.all_converged and single.all_converged
    assert block.num_matvecs < cold.num_matvecs
    assert block.settings["warm_start"] == "block 10" and single.settings["warm_start"] == "vector"
    np.testing.assert_allclose(block.eigenvalues, cold.eigenvalues, rtol=1e-9)


def test_invariant_start_that_misses_the_top_is_not_accepted():
    # A start spanning an exact invariant subspace (eigenvalues 91..95) gives exact Ritz pairs after five
    # steps; the method must still search the complement and find 100..96.
    A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    V = torch.eye(100, dtype=torch.float64)[:, 90:95]
    res = lanczos(A, k=5, tol=1e-10, v0=V)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, [100, 99, 98, 97, 96], rtol=1e-10)


def test_repeated_eigenvalue_found_with_its_multiplicity():
    # Single-vector Krylov spaces see one direction per eigenspace; the copies come from the restart
    # after the Krylov space closes.
    A = torch.diag(torch.tensor([0.0] * 5 + [1.0], dtype=torch.float64))
    res = lanczos(A, k=2, which="SA", tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, [0.0, 0.0], atol=1e-12)


def test_thick_restart_caps_memory_and_converges():
    A = wishart(300, 600, seed=7)
    res = lanczos(A, k=6, tol=1e-9, max_steps=14)
    assert res.all_converged and res.settings["restarts"] > 0
    np.testing.assert_allclose(res.eigenvalues, _reference(A, 6, "LA"), rtol=1e-8)
    _check_pairs(A, res)


def test_dense_and_operator_agree_and_products_are_counted():
    A = wishart(120, 200, seed=8)
    op = DenseOperator(A)
    r1, r2 = lanczos(A, k=2, seed=3), lanczos(op, k=2, seed=3)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    assert op.num_matvecs == r2.num_matvecs


def test_float32_operator_products_and_vectors():
    A = wishart(100, 200, seed=9)
    res = lanczos(A.float(), k=2, tol=1e-5)
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(res.eigenvalues, _reference(A, 2, "LA"), rtol=1e-5)


def test_scaled_operator():
    A = wishart(80, 160, seed=10)
    s = torch.linspace(0.5, 2.0, 80, dtype=torch.float64)
    res = lanczos(ScaledOperator(A, s), k=2, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, _reference(s[:, None] * A * s[None], 2, "LA"), rtol=1e-8)


def test_seed_reproducible_and_global_rng_untouched():
    A = wishart(100, 150, seed=11)
    before = rng_snapshot()
    r1 = lanczos(A, k=3, seed=5)
    r2 = lanczos(A, k=3, seed=5)
    assert_rng_unchanged(before)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_matvecs == r2.num_matvecs


@pytest.mark.parametrize("k", [0, -1, 50, 51])
def test_k_out_of_range_names_k_and_p(k):
    with pytest.raises(ConfigError, match=rf"k={k}.*P=50"):
        lanczos(torch.eye(50, dtype=torch.float64), k=k)


def test_config_errors():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ConfigError, match="which"):
        lanczos(A, which="LM")
    with pytest.raises(ConfigError, match="2\\*k <= P"):
        lanczos(A, k=6, which="both")
    with pytest.raises(ConfigError, match="max_steps"):
        lanczos(A, k=3, max_steps=3)
    with pytest.raises(ConfigError, match="v0"):
        lanczos(A, v0=torch.ones(9))
    with pytest.raises(ConfigError, match="square"):
        lanczos(torch.ones(3, 4))


def test_small_dimension_whole_space():
    A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))
    res = lanczos(A, k=2, tol=1e-12)
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, [3.0, 2.0])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    ev=st.lists(st.floats(-100, 100, allow_nan=False), min_size=6, max_size=40),
    k=st.integers(1, 3),
    which=st.sampled_from(["LA", "SA"]),
    seed=st.integers(0, 1000),
)
def test_property_random_spectra(ev, k, which, seed):
    ev = np.round(np.asarray(ev), 1)  # rounded: repeated eigenvalues are common
    A = with_spectrum(ev, seed=seed)
    res = lanczos(A, k=k, which=which, tol=1e-10, seed=seed)
    scale = max(float(np.abs(ev).max()), 1e-3)
    ref = _reference(A, k, which)
    if res.all_converged:
        np.testing.assert_allclose(res.eigenvalues, ref, atol=1e-7 * scale)
    # Whatever happened, reported residuals are true residuals.
    Y = res.eigenvectors
    true_res = (A @ Y - Y * res.eigenvalues).norm(dim=0)
    np.testing.assert_allclose(res.residuals, true_res, atol=1e-9 * scale, rtol=1e-3)


def test_semi_orthogonal_steps_skip_the_subtraction_without_ghosts_or_lost_accuracy():
    # 60 steps on a spectrum with separated outliers: plain Lanczos would grow ghost copies of the top
    # eigenvalue here; skipping the subtraction while the basis stays semi-orthogonal must not.
    A = with_spectrum([50.0, 40.0, 30.0] + list(np.linspace(-1, 1, 197)), seed=5)
    ref = _reference(A, 6, "LA")
    for dtype, rtol, orth in ((torch.float64, 1e-9, 1e-8), (torch.float32, 1e-5, 1e-4)):
        res = lanczos(A.to(dtype), k=6, tol=1e-12 if dtype == torch.float64 else 1e-5, max_steps=60,
                      max_matvecs=60)
        assert res.settings["skipped_passes"] > 0
        top = res.eigenvalues[:3]
        np.testing.assert_allclose(top, ref[:3], rtol=rtol)
        # no second copy of an outlier among the other Ritz values
        assert float((res.eigenvalues[3:] - 30.0).abs().min()) > 1.0
        Y = res.eigenvectors.to(torch.float64)
        assert float((Y.T @ Y - torch.eye(6, dtype=torch.float64)).abs().max()) < orth


def test_float32_residuals_are_never_reported_below_the_rounding_of_a_product():
    # The Krylov estimate ||E s|| of a well-converged pair falls far below what float32 products can
    # resolve; the reported residual must not, and must stay an honest bound on the true one.
    A = with_spectrum([50.0, 40.0, 30.0] + list(np.linspace(-1, 1, 197)), seed=5)
    res = lanczos(A.to(torch.float32), k=3, tol=1e-5, max_steps=60, return_eigenvectors=True)
    eps = torch.finfo(torch.float32).eps
    assert res.all_converged
    assert bool((res.residuals >= 10 * eps).all()), res.residuals
    Y = res.eigenvectors.to(torch.float64)
    true = (A @ Y - Y * res.eigenvalues).norm(dim=0)
    assert bool((true <= 10 * res.residuals).all()), (true, res.residuals)


@pytest.mark.parametrize("criterion", ["residual", "eigenvalue"])
def test_a_tolerance_below_float32_precision_stops_at_the_precision_limit_not_the_iteration_cap(criterion):
    A = with_spectrum([50.0, 40.0, 30.0] + list(np.linspace(-1, 1, 197)), seed=5)
    res = lanczos(A.to(torch.float32), k=2, tol=1e-10, max_steps=60, criterion=criterion)
    assert res.settings["stop"].startswith("precision limit")
    assert "raise tol or use float64" in res.settings["stop"]
    assert not res.all_converged and res.num_matvecs < 60
    np.testing.assert_allclose(res.eigenvalues, _reference(A, 2, "LA"), rtol=1e-5)
    # the same operator in float64 reaches the tolerance
    assert lanczos(A, k=2, tol=1e-10, max_steps=60, criterion=criterion).all_converged
