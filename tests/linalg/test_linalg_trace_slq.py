import numpy as np
import pytest
import scipy.stats
import torch
from linalg_cases import assert_rng_unchanged, network_spectrum, rng_snapshot, wishart, with_spectrum

from diagnostics.errors import ConfigError
from diagnostics.linalg import (
    DenseOperator,
    SpectralDensity,
    TraceEstimate,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
)


@pytest.mark.parametrize("estimator", [hutchinson_trace, hutchpp_trace])
def test_unbiased_within_three_standard_errors(estimator):
    A = wishart(120, 80, seed=1) - 0.3 * torch.eye(120, dtype=torch.float64)
    exact = float(torch.trace(A))
    for seed in range(3):
        est = estimator(A, num_matvecs=60, seed=seed)
        assert isinstance(est, TraceEstimate) and est.num_matvecs == 60
        assert est.stderr > 0
        assert abs(est.mean - exact) <= 3 * est.stderr, (seed, est)


def test_hutchinson_stderr_matches_spread_over_seeds():
    A = with_spectrum(np.linspace(-1, 3, 60), seed=2)
    means = [hutchinson_trace(A, num_matvecs=20, seed=s).mean for s in range(40)]
    typical = np.median([hutchinson_trace(A, num_matvecs=20, seed=s).stderr for s in range(5)])
    assert 0.5 < np.std(means) / typical < 2.0


def test_hutchpp_beats_hutchinson_with_outliers():
    A = with_spectrum(network_spectrum(300, outliers=10, seed=3), seed=3)
    exact = float(torch.trace(A))
    err_h = np.sqrt(np.mean([(hutchinson_trace(A, num_matvecs=60, seed=s).mean - exact) ** 2 for s in range(10)]))
    err_pp = np.sqrt(np.mean([(hutchpp_trace(A, num_matvecs=60, seed=s).mean - exact) ** 2 for s in range(10)]))
    assert err_pp < 0.2 * err_h, (err_pp, err_h)


def test_products_are_batched_in_blocks():
    calls = []

    class Recorder(DenseOperator):
        def __matmul__(self, V):
            calls.append(1 if V.dim() == 1 else V.shape[1])
            return super().__matmul__(V)

    A = wishart(50, 60, seed=4)
    hutchinson_trace(Recorder(A), num_matvecs=40, seed=0, block_size=16)
    assert calls == [16, 16, 8]
    calls.clear()
    est = hutchpp_trace(Recorder(A), num_matvecs=30, seed=0, block_size=16)
    assert sum(calls) == 30 == est.num_matvecs and max(calls) <= 16 and len(calls) == 3


def test_probe_grouping_does_not_change_the_estimate():
    A = wishart(40, 50, seed=5)
    a = hutchinson_trace(A, num_matvecs=21, seed=7, block_size=4)
    b = hutchinson_trace(A, num_matvecs=21, seed=7, block_size=32)
    assert a.mean == pytest.approx(b.mean, rel=1e-12)


def test_trace_config_errors():
    with pytest.raises(ConfigError, match="num_matvecs"):
        hutchinson_trace(torch.eye(3), num_matvecs=1)
    with pytest.raises(ConfigError, match="num_matvecs"):
        hutchpp_trace(torch.eye(3), num_matvecs=3)
    with pytest.raises(ConfigError, match="square"):
        hutchinson_trace(torch.ones(2, 3))


def test_slq_trace_equals_hutchinson_with_same_probes():
    A = with_spectrum(network_spectrum(150, seed=6), seed=6)
    sd = spectral_density(A, num_probes=8, steps=20, seed=11)
    hut = hutchinson_trace(A, num_matvecs=8, seed=11)
    mean, stderr = sd.trace()
    assert mean == pytest.approx(hut.mean, rel=1e-10)
    assert stderr == pytest.approx(hut.stderr, rel=1e-8)


def test_slq_measure_close_to_eigenvalue_distribution():
    ev = network_spectrum(400, outliers=10, seed=7)
    A = with_spectrum(ev, seed=7)
    sd = spectral_density(A, num_probes=10, steps=40, seed=0)
    assert isinstance(sd, SpectralDensity)
    assert sd.nodes.shape == (10, 40) and sd.weights.shape == (10, 40)
    np.testing.assert_allclose(sd.weights.sum(1), 1.0, atol=1e-12)
    assert sd.num_matvecs == 400
    w1 = scipy.stats.wasserstein_distance(sd.nodes.flatten().numpy(), ev,
                                          u_weights=sd.weights.flatten().numpy())
    spread = ev.max() - ev.min()
    assert w1 < 0.01 * spread, w1
    # The smoothed density integrates to one on a grid covering the spectrum.
    grid = torch.linspace(ev.min() - 1, ev.max() + 1, 20001, dtype=torch.float64)
    dens = sd.density(grid, sigma2=1e-4)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)
    assert bool((dens >= 0).all())


def test_slq_exact_for_few_distinct_eigenvalues():
    # The Krylov space closes after as many steps as distinct eigenvalues: nodes are exact.
    A = with_spectrum([1.0] * 10 + [2.0] * 10 + [5.0] * 10, seed=8)
    sd = spectral_density(A, num_probes=3, steps=10, seed=1)
    for i in range(3):
        support = sd.nodes[i][sd.weights[i] > 1e-10]
        np.testing.assert_allclose(np.unique(np.round(support.numpy(), 8)), [1.0, 2.0, 5.0])
    assert sd.num_matvecs == 9


def test_estimators_leave_global_rng_alone():
    A = wishart(30, 40, seed=9)
    before = rng_snapshot()
    hutchinson_trace(A, num_matvecs=4)
    hutchpp_trace(A, num_matvecs=9)
    spectral_density(A, num_probes=2, steps=5)
    assert_rng_unchanged(before)


def test_slq_config_errors():
    with pytest.raises(ConfigError, match="num_probes"):
        spectral_density(torch.eye(3), num_probes=0)
    with pytest.raises(ConfigError, match="steps"):
        spectral_density(torch.eye(3), steps=0)
    with pytest.raises(ConfigError, match="sigma2"):
        spectral_density(torch.eye(3, dtype=torch.float64), 1, 2).density(torch.zeros(3), sigma2=0.0)


@pytest.mark.parametrize("per_call", [1, 3, 7])
def test_a_density_run_in_slices_equals_one_call(per_call):
    from diagnostics.linalg import DensityRun

    A = with_spectrum([1.0] * 5 + [2.0] * 5 + list(np.linspace(3.0, 9.0, 50)), seed=12)  # one probe closes early
    whole = spectral_density(A, num_probes=3, steps=25, seed=4)
    run = DensityRun(A, num_probes=3, steps=25, seed=4)
    calls = 0
    while run.advance(max_steps=per_call) is None:
        calls += 1
    assert calls >= (25 // per_call) - 1 and run.done
    assert torch.equal(run.result.nodes, whole.nodes) and torch.equal(run.result.weights, whole.weights)
    assert run.result.num_matvecs == whole.num_matvecs and run.result.settings == whole.settings
    run.close()  # a finished run closes quietly


def test_a_closed_density_run_cannot_advance_and_bad_arguments_fail_at_construction():
    from diagnostics.linalg import DensityRun

    run = DensityRun(torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)), num_probes=2, steps=6)
    assert run.advance(max_steps=1) is None and not run.done
    run.close()
    with pytest.raises(ConfigError, match="DensityRun: advance"):
        run.advance()
    with pytest.raises(ConfigError, match="num_probes"):
        DensityRun(torch.eye(3), num_probes=0)
