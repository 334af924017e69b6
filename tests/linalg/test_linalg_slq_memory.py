"""Stochastic Lanczos quadrature within a memory budget: probe groups and a window of kept vectors,
against the exact spectrum and the exact quadrature moments (float64 dense references)."""

import numpy as np
import pytest
import scipy.stats
import torch
from linalg_cases import network_spectrum, with_spectrum

from diagnostics.errors import ConfigError
from diagnostics.linalg import BasisWorkspace, DensityRun, spectral_density
from diagnostics.linalg.operator import rademacher_probes
from diagnostics.linalg.slq import DENSITY_WORK_VECTORS, density_plan

P = 400


@pytest.fixture(scope="module")
def spectrum():
    ev = network_spectrum(P, outliers=10, seed=7)
    return ev, with_spectrum(ev, seed=7)


def _bytes(vectors: int, itemsize: int = 8) -> int:
    return vectors * P * itemsize


def test_probes_in_groups_give_the_quadrature_of_all_at_once(spectrum):
    _, A = spectrum
    together = spectral_density(A, num_probes=4, steps=30, seed=3)
    assert together.settings["probe_group"] == 4 and together.settings["reorthogonalization"] == "full"
    for group in (1, 3):
        sd = spectral_density(A, num_probes=4, steps=30, seed=3,
                              max_memory=group * _bytes(30 + DENSITY_WORK_VECTORS))
        assert sd.settings["probe_group"] == group and sd.settings["reorthogonalization"] == "full"
        assert sd.settings["basis_bytes"] == group * _bytes(30) <= sd.settings["memory_budget"]
        assert sd.num_matvecs == together.num_matvecs == 120
        torch.testing.assert_close(sd.nodes, together.nodes, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sd.weights, together.weights, rtol=1e-8, atol=1e-12)
        # Every group after the first writes its basis where the first one did.
        assert sd.settings["groups_in_kept_memory"] == -(-4 // group) - 1
    assert together.settings["groups_in_kept_memory"] == 0


def test_a_kept_workspace_holds_the_bases_for_the_next_call_and_changes_no_number(spectrum):
    _, A = spectrum
    fresh = spectral_density(A, num_probes=4, steps=30, seed=3, max_memory=_bytes(2 * (30 + DENSITY_WORK_VECTORS)))
    ws = BasisWorkspace()
    for call in range(2):
        sd = spectral_density(A, num_probes=4, steps=30, seed=3, max_memory=_bytes(2 * (30 + DENSITY_WORK_VECTORS)),
                              workspace=ws)
        assert torch.equal(sd.nodes, fresh.nodes) and torch.equal(sd.weights, fresh.weights)
        assert sd.settings["groups_in_kept_memory"] == (1 if call == 0 else 2)
    assert ws.nbytes == sd.settings["basis_bytes"] == 2 * _bytes(30)
    run = DensityRun(A, num_probes=4, steps=30, seed=3, workspace=ws)  # one group of 4: more than is kept
    while run.advance(max_steps=7) is None:
        pass
    assert torch.equal(run.result.nodes, spectral_density(A, num_probes=4, steps=30, seed=3).nodes)
    assert run.result.settings["groups_in_kept_memory"] == 0 and ws.nbytes == 4 * _bytes(30)


@pytest.mark.parametrize("window", [2, 4, 8])
def test_a_window_of_vectors_keeps_the_measure_though_ritz_values_repeat(spectrum, window):
    ev, A = spectrum
    n, m = 6, 80
    full = spectral_density(A, num_probes=n, steps=m, seed=0)
    sd = spectral_density(A, num_probes=n, steps=m, seed=0, max_memory=_bytes(window + DENSITY_WORK_VECTORS))
    assert sd.settings["probe_group"] == 1 and sd.settings["basis_vectors"] == window
    assert sd.settings["reorthogonalization"] == f"against the latest {window} vectors"
    top = ev.max()
    near_top = (sd.nodes - top).abs() < 1e-6 * top
    # Orthogonality was lost: the largest eigenvalue reappears as copies (full reorthogonalisation: once).
    assert int(near_top[0].sum()) >= 3 and int(((full.nodes[0] - top).abs() < 1e-6 * top).sum()) == 1
    # ... and the copies share the weight of the one they repeat.
    full_top = ((full.nodes - top).abs() < 1e-6 * top)
    torch.testing.assert_close((sd.weights * near_top).sum(1), (full.weights * full_top).sum(1), rtol=1e-6, atol=1e-12)
    # The quadrature's moments are the probes' exact moments z^T A^k z (to rounding), as with full
    # reorthogonalisation.
    Z = rademacher_probes(P, 0, n, 0) / np.sqrt(P)
    Ak = torch.eye(P, dtype=torch.float64)
    for k in range(1, 9):
        Ak = Ak @ A
        exact = torch.einsum("pi,pq,qi->i", Z, Ak, Z)
        quad = (sd.weights * sd.nodes**k).sum(1)
        assert float((quad - exact).abs().max()) <= 1e-12 * top**k, k
    w1 = scipy.stats.wasserstein_distance(sd.nodes.flatten().numpy(), ev, u_weights=sd.weights.flatten().numpy())
    w1_full = scipy.stats.wasserstein_distance(full.nodes.flatten().numpy(), ev,
                                               u_weights=full.weights.flatten().numpy())
    assert w1 == pytest.approx(w1_full, rel=0.05) and w1 < 0.01 * (ev.max() - ev.min())


def test_a_sliced_run_within_a_budget_equals_one_call(spectrum):
    _, A = spectrum
    kwargs = dict(num_probes=3, steps=40, seed=2, max_memory=_bytes(5 + DENSITY_WORK_VECTORS))
    whole = spectral_density(A, **kwargs)
    run = DensityRun(A, **kwargs)
    while run.advance(max_steps=7) is None:
        pass
    assert torch.equal(run.result.nodes, whole.nodes) and torch.equal(run.result.weights, whole.weights)
    assert run.result.settings == whole.settings and whole.settings["basis_vectors"] == 5


def test_the_basis_follows_the_operator_dtype(spectrum):
    ev, A = spectrum
    sd32 = spectral_density(A.float(), num_probes=4, steps=30, seed=1)
    sd64 = spectral_density(A.float(), num_probes=4, steps=30, seed=1, basis_dtype=torch.float64)
    assert sd32.settings["basis_dtype"] == "float32" and sd64.settings["basis_dtype"] == "float64"
    assert sd32.settings["basis_bytes"] == 4 * 30 * P * 4
    for sd in (sd32, sd64):
        np.testing.assert_allclose(sd.weights.sum(1), 1.0, atol=1e-12)
    w1 = scipy.stats.wasserstein_distance(sd32.nodes.flatten().numpy(), sd64.nodes.flatten().numpy(),
                                          sd32.weights.flatten().numpy(), sd64.weights.flatten().numpy())
    assert w1 < 1e-4 * (ev.max() - ev.min())
    assert sd32.trace()[0] == pytest.approx(sd64.trace()[0], rel=1e-5)


def test_memory_too_small_for_one_probe_names_max_memory(spectrum):
    _, A = spectrum
    with pytest.raises(ConfigError, match=r"max_memory=.*give max_memory >= 16000"):
        spectral_density(A, num_probes=2, steps=10, max_memory=_bytes(4))
    with pytest.raises(ConfigError, match="max_memory must be a positive"):
        spectral_density(A, num_probes=2, steps=10, max_memory=0)
    with pytest.raises(ConfigError, match="spectral_density: basis_dtype"):
        spectral_density(A, num_probes=2, steps=10, basis_dtype=torch.float16)


def test_plans_at_model_sizes_under_the_automatic_budget():
    cpu = torch.device("cpu")
    # 3.2M float32 parameters: four probes of 32 vectors (1.6 GB) fit 2 GiB together.
    plan = density_plan(3_200_000, 4, 32, 4, None, cpu)
    assert (plan.group, plan.window, plan.within_budget, plan.source) == (4, 32, True, "automatic budget")
    # 30M: one probe at a time, with the latest vectors that fit beside its workspace.
    plan = density_plan(30_000_000, 4, 32, 4, None, cpu)
    assert (plan.group, plan.window, plan.within_budget) == (1, (2 << 30) // (30_000_000 * 4) - 3, True)
    # GPT-2 small (124M float32 parameters):
    plan = density_plan(124_000_000, 4, 32, 4, None, cpu)
    # 2 GiB holds four such vectors: too few for two plus the workspace, so the smallest run goes ahead
    # and says it is over the budget.
    assert (plan.group, plan.window, plan.within_budget) == (1, 2, False)
    # Explicit memory is a hard limit.
    with pytest.raises(ConfigError, match="max_memory"):
        density_plan(124_000_000, 4, 32, 4, 2 << 30, cpu)
