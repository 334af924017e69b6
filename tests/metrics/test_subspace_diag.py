"""grad_subspace against dense computations, through the Monitor (it needs the optimizer's update)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics.loss import ClassificationLoss
from diagnostics.metrics.curvature import HessianTop
from diagnostics.metrics.subspace import GradSubspace
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from tests.reference import dense_gradient, dense_hessian

F64 = torch.float64
K = 3


def make_case():
    """tanh MLP 5-8-3 (P = 75), float64, one probe batch of 40 and a training batch of 16."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
        probe = [(torch.randn(40, 5, dtype=F64), torch.randint(0, 3, (40,)))]
        train = (torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,)))
    return model, ClassificationLoss(), probe, train


def names(model):
    return [n for n, _ in model.named_parameters()]


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def dense_truth(model, loss_fn, probe):
    H = dense_hessian(model, loss_fn, probe, names(model))
    g, _ = dense_gradient(model, loss_fn, probe, names(model))
    ev, vec = torch.linalg.eigh(H)
    assert float(ev[-K] - ev[-K - 1]) > 1e-3 * float(ev[-1])  # the top-k space is well defined
    return H, g, vec[:, -K:]


def frac(v, V):
    return float((V.T @ v).square().sum() / v.square().sum())


def overlap(U, V):
    return float((U.T @ V).square().sum() / U.shape[1])


def run_monitor(tmp_path, diags, steps, lr=0.05, name="run"):
    """SGD on the training batch with the given diagnostics; returns (store, dense truths per step)."""
    model, loss_fn, probe, train = make_case()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    truths = []
    with Monitor(model, loss_fn, run=tmp_path / name, diagnostics=diags, optimizer=opt, probe_data=probe,
                 num_classes=K, strict=True) as mon:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_fn(model, train)
            loss.backward()
            H, g, V = dense_truth(model, loss_fn, probe)
            before = flat_params(model)
            mon.step(step, train, loss)
            opt.step()
            truths.append({"H": H, "g": g, "V": V, "update": flat_params(model) - before})
    return open_run(tmp_path / name), truths


def series(run, metric):
    s = run.series(metric)
    return dict(zip(s.step.tolist(), s.value.tolist()))


def test_fractions_and_overlaps_equal_dense_computations(tmp_path):
    diags = [HessianTop(every=1, tol=1e-10, max_matvecs=None), GradSubspace(every=1, reference_step=1)]
    run, truth = run_monitor(tmp_path, diags, steps=3)
    gf, uf = series(run, "grad_subspace_fraction"), series(run, "update_subspace_fraction")
    ghg = series(run, "grad_hessian_overlap")
    prev, ref = series(run, "subspace_overlap_prev"), series(run, "subspace_overlap_ref")
    for step, t in enumerate(truth):
        assert gf[step] == pytest.approx(frac(t["g"], t["V"]), abs=1e-7)
        assert uf[step] == pytest.approx(frac(t["update"], t["V"]), abs=1e-7)
        Hg = t["H"] @ t["g"]
        assert ghg[step] == pytest.approx(float(t["g"] @ Hg / (t["g"].norm() * Hg.norm())), abs=1e-8)
    assert 0 not in prev and set(prev) == {1, 2}
    for step in (1, 2):
        assert prev[step] == pytest.approx(overlap(truth[step - 1]["V"], truth[step]["V"]), abs=1e-7)
    assert set(ref) == {1, 2}  # the reference is the first probe at or after step 1
    assert ref[1] == pytest.approx(1.0, abs=1e-9)
    assert ref[2] == pytest.approx(overlap(truth[1]["V"], truth[2]["V"]), abs=1e-7)


def test_result_does_not_depend_on_the_order_of_the_diagnostics(tmp_path):
    a, _ = run_monitor(tmp_path, [HessianTop(every=1, tol=1e-10, max_matvecs=None), GradSubspace(every=1)], 2, name="a")
    b, _ = run_monitor(tmp_path, [GradSubspace(every=1), HessianTop(every=1, tol=1e-10, max_matvecs=None)], 2, name="b")
    for metric in ("grad_subspace_fraction", "update_subspace_fraction", "subspace_overlap_prev"):
        sa, sb = series(a, metric), series(b, metric)
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert sa[k] == pytest.approx(sb[k], abs=1e-9)


def test_eigenvectors_are_reused_never_recomputed(tmp_path):
    run, _ = run_monitor(tmp_path, [HessianTop(every=1), GradSubspace(every=1)], 2)
    st = run.status()
    # grad_subspace pays only the H g product; the eigenvectors come from hessian_top's probe.
    assert st[st.diagnostic == "grad_subspace"].num_matvecs.tolist() == [1, 1]


def test_stale_eigenvectors_when_hessian_top_is_not_due(tmp_path):
    diags = [HessianTop(every=2, tol=1e-10, max_matvecs=None), GradSubspace(every=1)]
    run, truth = run_monitor(tmp_path, diags, steps=3)
    gf = series(run, "grad_subspace_fraction")
    assert gf[1] == pytest.approx(frac(truth[1]["g"], truth[0]["V"]), abs=1e-7)  # step-0 eigenvectors
    assert gf[2] == pytest.approx(frac(truth[2]["g"], truth[2]["V"]), abs=1e-7)
    # overlaps only when a new probe appears: steps 0 (no previous) and 2
    assert set(series(run, "subspace_overlap_prev")) == {2}
    assert series(run, "subspace_overlap_prev")[2] == pytest.approx(overlap(truth[0]["V"], truth[2]["V"]), abs=1e-7)


def test_without_hessian_top_only_the_one_hvp_proxy_and_a_reason(tmp_path):
    run, truth = run_monitor(tmp_path, [GradSubspace(every=1)], 1)
    assert set(run.series().metric) - {"monitor_seconds"} == {"grad_hessian_overlap"}
    st = run.status().iloc[0]
    assert st.status == "ok" and "hessian_top" in st.reason


def test_batch_gradient_option_uses_the_users_grad(tmp_path):
    model, loss_fn, probe, train = make_case()
    # the user's mini-batch gradient, at the parameters of step 0
    g_batch, _ = dense_gradient(model, loss_fn, [train], names(model))
    run, truth = run_monitor(tmp_path, [HessianTop(every=1, tol=1e-10, max_matvecs=None),
                                        GradSubspace(every=1, gradient="batch")], 1)
    assert series(run, "grad_subspace_fraction")[0] == pytest.approx(frac(g_batch, truth[0]["V"]), abs=1e-7)


def test_full_preset_includes_it_and_blocks_must_match(tmp_path):
    run, _ = run_monitor(tmp_path, [HessianTop(every=1, params={"head": ["2.*"]}),
                                    GradSubspace(every=1, params={"head": ["2.*"]})], 1)
    s = run.series("grad_subspace_fraction")
    assert s.key.tolist() == ["head"]


def test_without_the_update_the_rest_equals_dense_computations_at_the_step(tmp_path):
    """update=False (how checkpoints run it): the gradient fraction and the overlaps are recorded at the step
    itself, equal to the dense references, with no update fraction and nothing waiting for the optimizer."""
    sub = GradSubspace(every=1, update=False)
    assert "update" not in sub.requires and "update" in GradSubspace.requires
    diags = [HessianTop(every=1, tol=1e-10, max_matvecs=None), sub]
    run, truth = run_monitor(tmp_path, diags, steps=3)
    gf, prev = series(run, "grad_subspace_fraction"), series(run, "subspace_overlap_prev")
    assert not series(run, "update_subspace_fraction")
    for step, t in enumerate(truth):
        assert gf[step] == pytest.approx(frac(t["g"], t["V"]), abs=1e-7)
    for step in (1, 2):
        assert prev[step] == pytest.approx(overlap(truth[step - 1]["V"], truth[step]["V"]), abs=1e-7)
    assert run.meta["diagnostics"]["grad_subspace"]["update"] is False
