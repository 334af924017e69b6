"""LanczosRun: lanczos() in slices, with the same arithmetic as one call."""

import numpy as np
import pytest
import torch
from linalg_cases import network_like, with_spectrum

from diagnostics.errors import ConfigError
from diagnostics.linalg import BasisWorkspace, DenseOperator, LanczosRun, lanczos


def _same(a, b) -> None:
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert torch.equal(a.residuals, b.residuals) and torch.equal(a.converged, b.converged)
    assert a.num_matvecs == b.num_matvecs
    assert (a.eigenvectors is None) == (b.eigenvectors is None)
    if a.eigenvectors is not None:
        assert torch.equal(a.eigenvectors, b.eigenvectors)
    drop = ("max_seconds",)
    assert {k: v for k, v in a.settings.items() if k not in drop} == {
        k: v for k, v in b.settings.items() if k not in drop}


@pytest.mark.parametrize("slice_size", [1, 3, 7])
@pytest.mark.parametrize("case", ["plain", "restarts", "repeated"])
def test_slices_give_exactly_what_one_call_gives(slice_size, case):
    if case == "repeated":  # invariant subspaces and fresh directions, two copies of the top eigenvalue
        A = with_spectrum(np.concatenate([[5.0, 5.0, 4.0], np.linspace(-1, 1, 97)]), seed=3)
        kwargs = {"k": 3, "tol": 1e-8}
    else:
        A = network_like(300, outliers=10, seed=1)
        kwargs = {"k": 6, "tol": 1e-8, "max_steps": 14 if case == "restarts" else None}
    whole = lanczos(DenseOperator(A), seed=5, **kwargs)
    run = LanczosRun(DenseOperator(A), seed=5, **kwargs)
    calls = 0
    while run.advance(max_matvecs=slice_size) is None:
        calls += 1
        assert calls < 10_000
    _same(run.result, whole)
    assert run.done and calls >= whole.num_matvecs // slice_size - 1
    if case == "restarts":
        assert whole.settings["restarts"] > 0


def test_interim_values_rise_towards_the_result_and_do_not_change_it():
    A = network_like(300, outliers=10, seed=2)
    exact = np.sort(np.linalg.eigvalsh(A.numpy()))[::-1][:4]
    whole = lanczos(DenseOperator(A), k=4, tol=1e-8, seed=1)
    run = LanczosRun(DenseOperator(A), k=4, tol=1e-8, seed=1)
    first = run.interim()
    assert first.settings["stop"] == "paused" and first.num_matvecs == 0 and first.eigenvectors is None
    assert torch.isnan(first.eigenvalues).all()
    previous = None
    while run.advance(max_matvecs=2) is None:
        now = run.interim()
        assert now.eigenvectors is None and now.settings["stop"] == "paused"
        top = now.eigenvalues[0].item()
        assert top <= exact[0] + 1e-9  # Ritz values of a symmetric matrix lie inside its spectrum
        if previous is not None:
            assert top >= previous - 1e-12  # and the largest only grows with the Krylov space
        previous = top
    _same(run.result, whole)
    assert run.interim() is run.result


def test_max_seconds_per_call_runs_at_least_one_product():
    A = network_like(200, seed=4)
    run = LanczosRun(DenseOperator(A), k=3, tol=1e-8)
    assert run.advance(max_seconds=1e-9) is None
    assert run.interim().num_matvecs == 1


def test_errors_come_at_construction_and_after_close():
    A = network_like(50, seed=0)
    with pytest.raises(ConfigError, match="k=50"):
        LanczosRun(DenseOperator(A), k=50)
    run = LanczosRun(DenseOperator(A), k=2)
    run.advance(max_matvecs=2)
    run.close()
    with pytest.raises(ConfigError, match="after close"):
        run.advance()


def test_max_matvecs_caps_the_whole_run_and_seconds_count_only_the_run():
    import time

    A = network_like(300, seed=6)
    run = LanczosRun(DenseOperator(A), k=6, tol=1e-12, max_matvecs=9)
    while run.advance(max_matvecs=2) is None:
        pass
    assert run.result.num_matvecs == 9 and run.result.settings["stop"] == "max_matvecs"
    run2 = LanczosRun(DenseOperator(A), k=2, tol=1e-8)
    run2.advance(max_matvecs=1)
    time.sleep(0.2)  # a pause between slices is not the run's time
    res = None
    while res is None:
        res = run2.advance()
    assert res.seconds < 0.2


def test_a_kept_basis_gives_the_same_answers_and_is_reused_only_when_free():
    A = network_like(300, outliers=10, seed=1)
    fresh = lanczos(DenseOperator(A), k=6, tol=1e-8, seed=5)
    ws = BasisWorkspace()
    first = lanczos(DenseOperator(A), k=6, tol=1e-8, seed=5, workspace=ws)
    second = lanczos(DenseOperator(A), k=6, tol=1e-8, seed=5, workspace=ws)
    assert not first.settings["basis_reused"] and second.settings["basis_reused"]
    assert ws.nbytes == first.settings["basis_bytes"] > 0
    for res in (first, second):  # memory left by the first run changes nothing in the second
        drop = ("basis_reused",)
        assert torch.equal(res.eigenvalues, fresh.eigenvalues) and torch.equal(res.eigenvectors, fresh.eigenvectors)
        assert {k: v for k, v in res.settings.items() if k not in drop} == {
            k: v for k, v in fresh.settings.items() if k not in drop}
    # A paused run holds the kept memory: a run started meanwhile gets its own and both stay exact.
    paused = LanczosRun(DenseOperator(A), k=6, tol=1e-8, seed=5, workspace=ws)
    assert paused.advance(max_matvecs=4) is None
    meanwhile = lanczos(DenseOperator(A), k=6, tol=1e-8, seed=5, workspace=ws)
    assert not meanwhile.settings["basis_reused"] and torch.equal(meanwhile.eigenvalues, fresh.eigenvalues)
    while paused.advance() is None:
        pass
    assert paused.result.settings["basis_reused"] and torch.equal(paused.result.eigenvalues, fresh.eigenvalues)
    # Once the paused run has ended its memory is free again; a smaller problem takes a view of it.
    small = lanczos(DenseOperator(A[:100, :100]), k=2, tol=1e-8, seed=5, workspace=ws)
    assert small.settings["basis_reused"] and ws.nbytes == first.settings["basis_bytes"]
    # Another dtype does not fit the kept buffer: replaced, not kept twice.
    other = lanczos(DenseOperator(A.float()), k=2, tol=1e-5, seed=5, workspace=ws)
    assert not other.settings["basis_reused"] and ws.nbytes == other.settings["basis_bytes"]
    ws.clear()
    assert ws.nbytes == 0
    # A basis over max_bytes is never kept.
    small_ws = BasisWorkspace(max_bytes=first.settings["basis_bytes"] - 1)
    for _ in range(2):
        res = lanczos(DenseOperator(A), k=6, tol=1e-8, seed=5, workspace=small_ws)
        assert not res.settings["basis_reused"] and small_ws.nbytes == 0
    with pytest.raises(ConfigError, match="max_bytes"):
        BasisWorkspace(max_bytes=-1)


def test_a_workspace_keeps_cpu_memory_only():
    ws = BasisWorkspace()
    t, reused = ws.take(4, 10, torch.float32, torch.device("meta"))  # any device but the CPU: nothing kept
    assert t.shape == (4, 10) and t.device.type == "meta" and not reused and ws.nbytes == 0
    t, reused = ws.take(4, 10, torch.float32, torch.device("cpu"))
    assert not reused and ws.nbytes == 160
    del t
    t, reused = ws.take(2, 10, torch.float32, torch.device("cpu"))
    assert reused and ws.reuses == 1
