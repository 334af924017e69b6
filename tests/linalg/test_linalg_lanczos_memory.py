"""Lanczos at large P: basis dtype and device, the memory budget, thick restarts with a small basis."""

import importlib
import json

import numpy as np
import pytest
import torch
from linalg_cases import network_like

from diagnostics.errors import ConfigError
from diagnostics.linalg import lanczos
from diagnostics.linalg.lanczos import WORK_VECTORS, _lanczos

# The package exports the function under the module's name, so the module is fetched by its path.
lanczos_module = importlib.import_module("diagnostics.linalg.lanczos_basis")  # the basis sizing rules


class Diagonal:
    """``diag(d)`` as a LinearOperator: products cost O(P), so large P stays cheap in tests."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.shape = (d.numel(), d.numel())
        self.dtype = d.dtype
        self.device = d.device
        self.num_matvecs = 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1 if V.dim() == 1 else V.shape[1]
        return self.d * V if V.dim() == 1 else self.d[:, None] * V


def _repeated_negative_spectrum(P: int = 2000, seed: int = 0) -> np.ndarray:
    """Outliers with multiplicities at both ends (5 x3, 4, 3.5 x2; -6 x3, -5, -4.5 x2), bulk in [-1, 1]."""
    rng = np.random.default_rng(seed)
    d = np.concatenate([[5.0] * 3, [4.0], [3.5] * 2, [-6.0] * 3, [-5.0], [-4.5] * 2, rng.uniform(-1, 1, P - 12)])
    rng.shuffle(d)
    return d


def test_float32_operator_keeps_a_float32_basis_and_meets_tol():
    A = network_like(300, seed=12)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    tol = 1e-5
    res = lanczos(A.float(), k=5, tol=tol)
    assert res.settings["basis_dtype"] == "float32" and res.settings["basis_device"] == "cpu"
    assert res.settings["basis_bytes"] == res.settings["basis_vectors"] * 300 * 4
    assert res.all_converged and res.eigenvectors.dtype == torch.float32
    # A residual <= tol |theta| bounds the eigenvalue error; float32 rounding adds about 1e-6 ||A||.
    norm_a = float(ref.abs().max())
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=tol, atol=1e-6 * norm_a)
    # Reported residuals are the true ones up to float32 rounding, and the vectors are orthonormal.
    Y = res.eigenvectors.double()
    true_res = (A @ Y - Y * res.eigenvalues).norm(dim=0)
    np.testing.assert_allclose(res.residuals, true_res, atol=2e-6 * norm_a, rtol=0.1)
    assert torch.allclose(Y.T @ Y, torch.eye(5, dtype=torch.float64), atol=1e-5)


def test_float64_basis_on_request_for_a_float32_operator():
    A = network_like(300, seed=13)
    ref = torch.linalg.eigvalsh(A).flip(0)[:3]
    res = lanczos(A.float(), k=3, tol=1e-6, basis_dtype=torch.float64, basis_device="cpu")
    assert res.settings["basis_dtype"] == "float64" and res.settings["basis_bytes"] % 8 == 0
    assert res.all_converged and res.eigenvectors.dtype == torch.float32
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-5)
    with pytest.raises(ConfigError, match="basis_dtype"):
        lanczos(A, k=1, basis_dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("limit", ["max_steps", "max_memory"])
def test_small_basis_thick_restarts_find_repeated_and_negative_eigenvalues(dtype, which, limit):
    d = _repeated_negative_spectrum()
    P, k = d.size, 6
    itemsize = 8 if dtype == torch.float64 else 4
    m = k + 8
    kwargs = {"max_steps": m} if limit == "max_steps" else {"max_memory": (m + WORK_VECTORS) * P * itemsize}
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = lanczos(Diagonal(torch.tensor(d, dtype=dtype)), k=k, which=which, tol=tol, **kwargs)
    assert res.settings["basis_vectors"] == m and res.settings["basis_size_from"] == limit
    assert res.settings["restarts"] > 0, res.settings
    assert res.all_converged, res.settings
    ev = np.sort(d)
    ref = ev[::-1][:k] if which == "LA" else ev[:k]
    # Within tol of each value: every copy of 5 (or -6) is found, nothing from the bulk takes its place.
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=tol, atol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_ghost_copies_through_many_restarts(dtype):
    # A well separated top eigenvalue converges first; a basis of 12 vectors then restarts about twenty
    # times while the rest of the top 5 (inside the bulk) does not converge. Each restart keeps the
    # converged vector, and a lost orthogonality would show up as a second copy of 100.
    rng = np.random.default_rng(0)
    d = torch.tensor(np.concatenate([[100.0], rng.uniform(0.0, 1.0, 2999)]), dtype=dtype)
    ref = torch.sort(d.double(), descending=True).values[:5]
    res = lanczos(Diagonal(d), k=5, tol=1e-14, max_steps=12, max_matvecs=200)
    assert res.num_matvecs == 200 and res.settings["restarts"] >= 15
    assert int((res.eigenvalues > 50).sum()) == 1
    np.testing.assert_allclose(res.eigenvalues[0], 100.0, rtol=1e-12 if dtype == torch.float64 else 1e-6)
    assert float((res.eigenvalues[1:] - ref[1:]).abs().max()) < 0.1


def test_without_the_gram_schmidt_pass_restarts_show_ghosts():
    # The same kind of run with only the three-term recurrence: the ghost test above has teeth.
    rng = np.random.default_rng(0)
    d = torch.tensor(np.concatenate([[100.0], rng.uniform(0.0, 1.0, 399)]))
    plain = _lanczos(Diagonal(d), 5, "LA", 1e-14, 200, None, 0, False, 150, None, full_reorth=False)
    assert int((plain.eigenvalues > 50).sum()) > 1


def test_basis_bytes_respect_max_memory():
    # What this checks: the size of the preallocated basis buffer, read from the tensor itself, and the
    # workspace the budget reserves. Real peak allocation is measured in the profiler test below (CPU)
    # and in the CUDA test (allocator statistics).
    P, k = 300_000, 3
    budget = 20 * 2**20
    d = torch.linspace(-1.0, 1.0, P)
    d[:k] = torch.tensor([9.0, 8.0, 7.0])
    res = lanczos(Diagonal(d), k=k, tol=1e-5, max_memory=budget, return_eigenvectors=False)
    s = res.settings
    assert s["basis_dtype"] == "float32" and s["memory_budget"] == budget
    assert s["basis_bytes"] == s["basis_vectors"] * P * 4
    assert (s["basis_vectors"] + WORK_VECTORS) * P * 4 <= budget
    assert s["basis_vectors"] == budget // (P * 4) - WORK_VECTORS  # the budget binds: 17 - 4 vectors
    assert res.all_converged
    # A float32 basis: length-P dot products round at about eps32 sqrt(P) = 7e-5 relative here.
    np.testing.assert_allclose(res.eigenvalues, [9.0, 8.0, 7.0], rtol=1e-4)
    with pytest.raises(ConfigError, match=r"max_memory=.*give max_memory >= "):
        lanczos(Diagonal(d), k=k, max_memory=4 * P * 4)


def test_automatic_budget_lowers_the_basis_but_not_below_k_plus_spare(monkeypatch):
    P = 50_000
    d = torch.linspace(0.0, 1.0, P, dtype=torch.float64)
    d[:2] = torch.tensor([5.0, 4.0], dtype=torch.float64)
    monkeypatch.setattr(lanczos_module, "DEFAULT_BASIS_BYTES", 20 * P * 8)
    res = lanczos(Diagonal(d), k=2, tol=1e-8, return_eigenvectors=False)
    assert res.settings["basis_size_from"] == "automatic budget"
    assert res.settings["basis_vectors"] == 20 - WORK_VECTORS
    np.testing.assert_allclose(res.eigenvalues, [5.0, 4.0], rtol=1e-8)
    # A budget too small for the minimum gives the minimum, k + MIN_SPARE_VECTORS, not an error.
    monkeypatch.setattr(lanczos_module, "DEFAULT_BASIS_BYTES", P * 8)
    res = lanczos(Diagonal(d), k=2, tol=1e-8, return_eigenvectors=False)
    assert res.settings["basis_vectors"] == 2 + lanczos_module.MIN_SPARE_VECTORS
    np.testing.assert_allclose(res.eigenvalues, [5.0, 4.0], rtol=1e-8)
    # An explicit max_steps is not lowered by the automatic budget.
    res = lanczos(Diagonal(d), k=2, tol=1e-8, max_steps=30, return_eigenvectors=False)
    assert res.settings["basis_vectors"] == 30 and res.settings["memory_budget"] is None


def test_peak_allocated_bytes_stay_within_the_budget(tmp_path):
    # The peak of live tensor bytes during the run, from the "Total Allocated" field of torch's profiler
    # memory events (counted from the start of the profiled region), so it includes the operator's
    # products, the restart temporaries and the frontier. Process RSS would also count memory the C
    # allocator keeps after a free, which varies from run to run.
    P, budget = 2_000_000, 96 * 2**20
    d = torch.linspace(-1.0, 1.0, P)
    d[:3] = torch.tensor([9.0, 8.0, 7.0])
    op = Diagonal(d)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        res = lanczos(op, k=3, tol=1e-12, max_matvecs=60, max_memory=budget, return_eigenvectors=False)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not totals:
        pytest.skip("this torch's profiler records no memory events")
    assert res.settings["restarts"] > 0 and res.settings["basis_bytes"] <= budget
    assert max(totals) >= res.settings["basis_bytes"]  # the basis buffer was seen
    assert max(totals) <= budget, (max(totals), budget)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: allocator statistics")
@pytest.mark.parametrize("basis_device", [None, "cpu"])
def test_cuda_peak_allocation_within_the_budget(basis_device):
    dev = torch.device("cuda")
    P, budget = 4_000_000, 256 * 2**20  # 12 basis vectors of 16 MB beside the 4 of workspace
    d = torch.linspace(-1.0, 1.0, P, device=dev)
    d[:3] = torch.tensor([9.0, 8.0, 7.0], device=dev)
    op = Diagonal(d)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    res = lanczos(op, k=3, tol=1e-5, max_memory=budget, basis_device=basis_device)
    peak = torch.cuda.max_memory_allocated(dev) - base
    assert res.all_converged
    np.testing.assert_allclose(res.eigenvalues, [9.0, 8.0, 7.0], rtol=1e-5)
    assert res.settings["basis_device"].startswith("cpu" if basis_device == "cpu" else "cuda")
    # The budget (which covers the product), the returned [P, 3] eigenvectors and a chunk of them in
    # flight. With the basis on the CPU, the GPU holds only the product, its input and the eigenvectors.
    allowance = budget + (3 + 1) * P * 4
    if basis_device == "cpu":
        allowance = (2 + 3 + 1) * P * 4
    assert peak <= allowance, (peak, allowance)
