"""Trace estimators within a memory budget and in slices, against the exact trace (float64 dense)."""

import numpy as np
import pytest
import torch
from linalg_cases import network_like

from diagnostics.errors import ConfigError
from diagnostics.linalg import TraceRun, hutchinson_trace, hutchpp_trace
from diagnostics.linalg.trace import _plan

P = 300


@pytest.fixture(scope="module")
def A():
    return network_like(P, outliers=10, seed=3)


@pytest.mark.parametrize("per_call", [1, 2, 5])
def test_a_trace_run_in_slices_equals_one_call(A, per_call):
    whole = hutchpp_trace(A, num_matvecs=30, seed=2, block_size=4)
    run = TraceRun(A, num_matvecs=30, seed=2, block_size=4)
    calls = 0
    while run.advance(max_steps=per_call) is None:
        calls += 1
    # 10 sketch columns and 10 basis columns in blocks of 4 (3 + 3 products), 10 residual probes (3).
    assert calls == -(-9 // per_call) - 1
    assert run.result.mean == whole.mean and run.result.stderr == whole.stderr
    assert run.result.num_matvecs == whole.num_matvecs == 30 and run.result.settings == whole.settings


def test_memory_shrinks_the_block_then_the_sketch(A):
    exact = float(torch.trace(A))
    per_vector = P * 8
    roomy = hutchpp_trace(A, num_matvecs=60, seed=0)
    assert (roomy.settings["sketch_size"], roomy.settings["block_size"]) == (20, 32)
    # Room for the sketch and its basis (40 vectors) and a block of 3 probes (9 vectors).
    tight = hutchpp_trace(A, num_matvecs=60, seed=0, max_memory=49 * per_vector)
    assert (tight.settings["sketch_size"], tight.settings["block_size"]) == (20, 3)
    assert tight.mean == pytest.approx(roomy.mean, rel=1e-12)  # the same probes and sketch: block sizes only
    # Room for 13 vectors: a block of one probe (3 vectors) and a sketch of 5.
    small = hutchpp_trace(A, num_matvecs=60, seed=0, max_memory=13 * per_vector)
    assert (small.settings["sketch_size"], small.settings["num_probes"], small.settings["block_size"]) == (5, 50, 1)
    assert small.num_matvecs == 60 and abs(small.mean - exact) <= 4 * small.stderr
    # Room for 4 vectors: no sketch at all, Hutchinson with every product.
    none = hutchpp_trace(A, num_matvecs=60, seed=0, max_memory=4 * per_vector)
    assert none.settings["sketch_size"] == 0 and none.settings["method"].startswith("hutchinson")
    assert none.mean == pytest.approx(hutchinson_trace(A, num_matvecs=60, seed=0).mean, rel=1e-12)
    # The sketch pays for itself on a spectrum with outliers: Hutch++'s error is smaller than Hutchinson's.
    errors = {k: np.sqrt(np.mean([(hutchpp_trace(A, num_matvecs=60, seed=s, max_memory=m).mean - exact) ** 2
                                  for s in range(8)]))
              for k, m in (("full", None), ("none", 4 * per_vector))}
    assert errors["full"] < 0.5 * errors["none"], errors


def test_too_little_memory_for_one_probe_names_max_memory(A):
    for estimator in (hutchpp_trace, hutchinson_trace):
        with pytest.raises(ConfigError, match=r"max_memory=.*give max_memory >= 7200"):
            estimator(A, num_matvecs=10, max_memory=2 * P * 8)


def test_the_probes_follow_the_operator_dtype(A):
    est32 = hutchpp_trace(A.float(), num_matvecs=30, seed=1)
    est64 = hutchpp_trace(A.float(), num_matvecs=30, seed=1, basis_dtype=torch.float64)
    assert est32.settings["dtype"] == "float32" and est64.settings["dtype"] == "float64"
    assert est32.mean == pytest.approx(est64.mean, rel=1e-5)
    assert hutchinson_trace(A.float(), num_matvecs=10).settings["dtype"] == "float32"


def test_plans_at_gpt2_small_size_under_the_automatic_budget():
    cpu = torch.device("cpu")
    # 3.2M float32 parameters: the default sketch of 20 and blocks of 32 fit 2 GiB.
    assert _plan(3_200_000, 20, 32, 4, None, cpu, "t")[:2] == (20, 32)
    # 124M: four vectors fit; one probe at a time and no sketch.
    assert _plan(124_000_000, 20, 32, 4, None, cpu, "t")[:2] == (0, 1)
