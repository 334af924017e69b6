"""Reduced runs of the reproductions in examples/ (slow): each asserts the tolerance its script states.

The full runs, their commands and outputs are in examples/RESULTS.md; these keep the claims from rotting
as the library changes. One thread each, from a few seconds to about a minute.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _failed(checks):
    return [f"{name}: {value:.4g}" for name, value, ok in checks if not ok]


def test_adam_edge_of_stability(tmp_path):
    import adam_edge_of_stability as ex

    out = ex.run(lrs=(4e-3,), seeds=(0,), beta1_zero_lrs=(5e-4,), steps=600, every=10, out=tmp_path, verbose=False)
    assert len(out["checks"]) == 2 and not _failed(out["checks"])
    for r in out["results"]:
        assert r["first_crossing"] is not None and r["not_converged"] == 0
        assert r["raw_median_after"] < 0.1  # the control: raw lambda_max is nowhere near Adam's threshold


def test_edge_of_stability_gd_both_parities_and_control(tmp_path):
    import edge_of_stability_gd as ex

    out = ex.run(lr=0.25, control_lr=0.05, seeds=(0,), steps=500, every=20, tail=40, out=tmp_path, verbose=False)
    assert not _failed(out["checks"])
    (r,) = out["results"]
    assert r["first_crossing"] is not None and r["sharpness_end"] > 2 * r["sharpness_start"]  # progressive sharpening
    assert out["control"]["max_ratio"] < ex.CONTROL_MAX


def test_hessian_outliers_follow_the_number_of_classes():
    import hessian_outliers as ex

    out = ex.run(widths=(32, 128), classes=(10, 5), probes=(300,), claim_step=300, inputs=("pixels",), verbose=False)
    assert len(out["checks"]) == 4 and not _failed(out["checks"])


def test_sgd_trace_bound_and_gd_control():
    import sgd_trace_stability as ex

    out = ex.run(lrs=(0.1, 0.3), sgd_steps=8000, gd_steps=600, multi_lrs=(), verbose=False)
    stable = [r for r in out["sgd"] if r["stable"]]
    assert [r["lr"] for r in stable] == [0.1] and not _failed(out["checks"])
    gd = {r["lr"]: r for r in out["gd"]}
    # where SGD with batch 1 diverges, GD is stable with a trace ratio far above 1 (held by lambda_max only)
    assert gd[0.3]["stable"] and gd[0.3]["trace_ratio_end"] > 2 and gd[0.3]["lambda_ratio_end"] < 1.1


def test_gsnr_labels_microbatch_and_closed_form(tmp_path):
    import gsnr_checks as ex

    out = ex.run(probes=(0, 25, 100), claim_steps=(25, 100), micro=(128, 4), batches=500, out=tmp_path,
                 verbose=False)
    assert len(out["checks"]) == 4 and not _failed(out["checks"])


def test_gsnr_microbatch_default_reads_b_times_the_per_sample_gsnr(tmp_path):
    """With the diagnostic's default 8 micro-batches, and with 4, the Gaussian factor (M-3)/(M-1) brings the
    ratio to about b x the per-sample GSNR (without it: (M-1)/(M-3), 3 x at M = 4)."""
    import gsnr_checks as ex

    model, _ = ex.train_with_gsnr(False, (50,), 256, tmp_path, keep=50)
    checks = ex.microbatch_check(model, 1024, (8, 4), 50, lambda *a: None)
    assert len(checks) == 1 and 0.8 < checks[0][1] < 1.2  # M = 8, the default


def test_gradient_subspace_pixels_and_overlap():
    import gradient_subspace as ex

    out = ex.run(steps=1100, every=100, configs=(("pixels", False),), verbose=False)
    assert not _failed(out["checks"])
    ((r, s),) = out["results"]
    assert r["overlap_top"] > 0.4 and not math.isnan(s["overlap_ratio"])
