"""hessian_top / hessian_density / hessian_trace against dense truth on tiny float64 models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.linalg import BasisWorkspace, DenseOperator
from diagnostics.loss import ClassificationLoss
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.curvature import (
    GGNTop,
    HessianDensity,
    HessianTop,
    HessianTrace,
    parse_blocks,
)
from diagnostics.metrics.registry import get_diagnostic, preset_names, variants
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from tests.cases import get_case
from tests.reference import dense_ggn, dense_hessian

F64 = torch.float64


def make_ctx(case, step: int = 0, num_classes: int | None = 3) -> StepContext:
    return StepContext(step=step, model=case.model, loss_fn=case.loss_fn, batch=case.batches[0], loss=None,
                       probe_data=case.batches, num_classes=num_classes)


def values(out, metric: str, key: str = "all") -> list[float]:
    recs = sorted((r for r in out.records if r.metric == metric and r.key == key), key=lambda r: r.index)
    return [r.value for r in recs]


def names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def medium_case(seed: int = 0):
    """MLP 8-16-4 (P = 212), tanh, 64 samples: big enough for Lanczos to need real work."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(F64)
        batches = [(torch.randn(64, 8, dtype=F64), torch.randint(0, 4, (64,)))]

    class C:
        pass

    c = C()
    c.model, c.loss_fn, c.batches = model, ClassificationLoss(), batches
    return c


def _train(mon, case, opt, steps: int, after=lambda step: None) -> None:
    """``steps`` monitored steps of ``opt`` on the case's first batch; ``after(step)`` after each."""
    for step in range(steps):
        opt.zero_grad()
        loss = case.loss_fn(case.model, case.batches[0])
        loss.backward()
        mon.step(step, case.batches[0], loss)
        opt.step()
        after(step)


# --- hessian_top ----------------------------------------------------------------------------------------

def _nudge(model: nn.Module, seed: int) -> None:
    """What an optimizer step does to the parameters: a change in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype), alpha=0.05)


def test_capped_probes_resume_and_end_at_the_eigenvalues_of_the_step_they_began():
    case = medium_case()
    truth = torch.linalg.eigvalsh(dense_hessian(case.model, case.loss_fn, case.batches, names(case.model)))
    whole = HessianTop(k=4, tol=1e-8).compute(make_ctx(case))
    assert whole.status == "ok" and not values(whole, "hessian_probe_step")
    d = HessianTop(k=4, tol=1e-8, max_matvecs=5)
    outs = []
    for step in range(0, 200, 10):
        out = d.compute(make_ctx(case, step=step))
        outs.append(out)
        _nudge(case.model, step)  # training moves on between probes
        if out.status == "ok":
            break
    assert len(outs) > 2 and all(o.num_matvecs <= 5 for o in outs)
    assert all(o.status == "continues" and "continues at the next probe" in o.reason for o in outs[:-1])
    assert not any(o.records for o in outs[:-1])  # nothing stored until the run ends
    last = outs[-1]
    assert last.status == "ok" and values(last, "hessian_probe_step") == [0.0]
    got = torch.tensor(values(last, "hessian_eigenvalue"), dtype=F64)
    assert torch.allclose(got, truth.flip(0)[:4], rtol=1e-7)  # the Hessian of step 0, not of the last probe
    assert torch.allclose(got, torch.tensor(values(whole, "hessian_eigenvalue"), dtype=F64), rtol=1e-9)
    assert sum(o.num_matvecs for o in outs) == whole.num_matvecs
    assert not d.unfinished


def test_without_resume_capped_probes_start_again():
    case = medium_case()
    d = HessianTop(k=4, tol=1e-8, max_matvecs=5, resume=False)
    for step in range(3):
        out = d.compute(make_ctx(case, step=step))
        assert out.status == "not_converged" and "max_matvecs" in out.reason
        assert out.num_matvecs == 5 and not d.unfinished
    assert not values(out, "hessian_probe_step")


def test_a_resumed_run_shares_the_eigenspace_of_the_step_it_began():
    case = medium_case()
    d = HessianTop(k=2, tol=1e-8, max_matvecs=6)
    step = 0
    while True:
        ctx = make_ctx(case, step=step)
        out = d.compute(ctx)
        if out.status == "ok":
            break
        assert ctx.top_eigenspace("hessian", "all") is None  # nothing shared while the run is unfinished
        step += 1
    assert step > 0 and ctx.top_eigenspace("hessian", "all").step == 0


def test_hessian_top_matches_dense_eigenvalues_and_bottom():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    ev = torch.linalg.eigvalsh(H)
    d = HessianTop(bottom=True, tol=1e-9, max_matvecs=None)
    out = d.compute(make_ctx(case))
    assert out.status == "ok"
    top = values(out, "hessian_eigenvalue")
    assert len(top) == 3  # k defaults to num_classes
    torch.testing.assert_close(torch.tensor(top, dtype=F64), ev.flip(0)[:3], rtol=1e-7, atol=1e-10)
    assert values(out, "hessian_converged") == [1.0, 1.0, 1.0]
    assert max(values(out, "hessian_residual")) <= 1e-9 * abs(top[0]) * 10
    assert values(out, "hessian_bottom_eigenvalue")[0] == pytest.approx(float(ev[0]), rel=1e-7, abs=1e-10)
    assert out.num_matvecs > 0
    # eigenvectors stay in the diagnostic (warm start), never in the records
    assert d.vectors["all"].shape == (H.shape[0], 3)


def test_default_k_without_num_classes_is_ten_capped_by_dimension():
    case = get_case("mlp")
    out = HessianTop(tol=1e-6).compute(make_ctx(case, num_classes=None))
    assert len(values(out, "hessian_eigenvalue")) == 10
    out = HessianTop(tol=1e-6, params={"b": ["2.bias"]}).compute(make_ctx(case, num_classes=None))
    assert len(values(out, "hessian_eigenvalue", "b")) == 2  # a 3-parameter block: k capped at P - 1
    with pytest.raises(ConfigError, match="k=5 must be smaller"):
        HessianTop(k=5, params={"b": ["2.bias"]}).compute(make_ctx(case))


def test_hessian_top_per_block_matches_dense_sub_hessian():
    case = get_case("mlp")
    blocks = {"first": ["0.weight"], "mixed": ["0.*", "2.bias"]}
    d = HessianTop(k=2, params=blocks, tol=1e-9, max_matvecs=None)
    out = d.compute(make_ctx(case))
    for key, sel in (("first", ["0.weight"]), ("mixed", ["0.weight", "0.bias", "2.bias"])):
        Hb = dense_hessian(case.model, case.loss_fn, case.batches, sel)
        ref = torch.linalg.eigvalsh(Hb).flip(0)[:2]
        torch.testing.assert_close(torch.tensor(values(out, "hessian_eigenvalue", key), dtype=F64), ref,
                                   rtol=1e-7, atol=1e-10)


def test_ggn_variant_writes_ggn_metrics_and_matches_dense_ggn():
    case = get_case("mlp")
    d = HessianTop(kind="ggn", k=2, tol=1e-9, max_matvecs=None)
    assert d.name == "ggn_top" and "ggn_eigenvalue" in d.metrics
    # The name in the status table is a registry key: the GGN twin is its own registered class.
    assert type(d) is GGNTop and variants()["ggn_top"] is GGNTop and "ggn_top" not in preset_names("full")
    assert type(get_diagnostic("ggn_top")) is GGNTop
    with pytest.raises(ConfigError, match="ggn_top measures the ggn"):
        GGNTop(kind="hessian")
    out = d.compute(make_ctx(case))
    assert {r.metric for r in out.records} == {"ggn_eigenvalue", "ggn_residual", "ggn_converged"}
    G = dense_ggn(case.model, case.loss_fn, case.batches, names(case.model))
    torch.testing.assert_close(torch.tensor(values(out, "ggn_eigenvalue"), dtype=F64),
                               torch.linalg.eigvalsh(G).flip(0)[:2], rtol=1e-7, atol=1e-10)


def test_warm_start_reduces_products_on_a_slowly_changing_model():
    case = medium_case()
    warm = HessianTop(k=4, tol=1e-4, max_matvecs=None)
    warm.compute(make_ctx(case))
    first = warm.last_matvecs["all"]
    # The model changes a little between probes (1e-4 of each tensor's mean magnitude).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in case.model.parameters():
            p.add_(1e-4 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=F64))
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    ref = torch.linalg.eigvalsh(H).flip(0)[:4]
    out_warm = warm.compute(make_ctx(case, step=1))
    out_cold = HessianTop(k=4, tol=1e-4, max_matvecs=None).compute(make_ctx(case, step=1))
    for out in (out_warm, out_cold):  # the same accuracy
        assert out.status == "ok"
        torch.testing.assert_close(torch.tensor(values(out, "hessian_eigenvalue"), dtype=F64), ref,
                                   rtol=1e-6, atol=1e-10)
    assert out_cold.num_matvecs == first  # same operator size, same cold start: same cost
    # measured when written: 15 warm against 31 cold
    assert out_warm.num_matvecs < 0.7 * out_cold.num_matvecs, (out_warm.num_matvecs, out_cold.num_matvecs)
    assert out_warm.settings["all"]["warm_start"] == "block 4"


def test_budget_exhaustion_is_not_converged_and_stored_as_such(tmp_path):
    case = medium_case()
    resumed = HessianTop(k=4, tol=1e-10, max_matvecs=6).compute(make_ctx(case))
    assert resumed.status == "continues" and "max_matvecs" in resumed.reason and not resumed.records
    d = HessianTop(k=4, tol=1e-10, max_matvecs=6, resume=False)
    out = d.compute(make_ctx(case))
    assert out.status == "not_converged" and out.num_matvecs <= 6
    assert 0.0 in values(out, "hessian_converged")
    assert "max_matvecs" in out.reason
    # Through the Monitor: flagged numbers in the store, status not_converged.
    model = case.model
    with Monitor(model, case.loss_fn, run=tmp_path / "run",
                 diagnostics=[HessianTop(k=4, tol=1e-10, max_matvecs=6, resume=False)],
                 probe_data=case.batches, strict=True) as mon:
        mon.step(0, case.batches[0])
    run = open_run(tmp_path / "run")
    st = run.status()
    row = st[st.diagnostic == "hessian_top"].iloc[0]
    assert row.status == "not_converged" and row.num_matvecs <= 6
    conv = run.series("hessian_converged")
    assert (conv.value == 0).any()


def test_max_seconds_budget_stops_early():
    case = medium_case()
    out = HessianTop(k=4, tol=1e-12, max_matvecs=None, max_seconds=1e-9).compute(make_ctx(case))
    assert out.status == "continues" and "max_seconds" in out.reason and not out.records
    assert out.num_matvecs <= 2
    out = HessianTop(k=4, tol=1e-12, max_matvecs=None, max_seconds=1e-9, resume=False).compute(make_ctx(case))
    assert out.status == "not_converged"
    assert out.num_matvecs <= 2


def test_nonfinite_parameters_fail_with_reason_and_no_numbers(tmp_path):
    case = medium_case()
    with torch.no_grad():
        case.model[0].weight[0, 0] = float("nan")
    for d in (HessianTop(k=2), HessianDensity(num_probes=2, steps=4), HessianTrace(num_matvecs=12)):
        out = d.compute(make_ctx(case))
        assert out.status == "failed" and out.records == [] and out.reason
    with Monitor(case.model, case.loss_fn, run=tmp_path / "run", diagnostics=[HessianTop(k=2)],
                 probe_data=case.batches) as mon:
        mon.step(0, case.batches[0])
    run = open_run(tmp_path / "run")
    st = run.status()
    assert st.iloc[0].status == "failed" and st.iloc[0].reason
    assert run.series("hessian_eigenvalue").empty
    assert (run.events().kind == "estimator_failed").any()


class _NaNAfter(DenseOperator):
    """A dense operator whose products turn NaN after ``n`` columns (a curvature blow-up mid-estimate)."""

    def __init__(self, matrix: torch.Tensor, n: int) -> None:
        super().__init__(matrix)
        self.n = n
        self.param_names = ["w"]
        self.param_slices = {"w": slice(0, matrix.shape[0])}

    def __matmul__(self, V):
        out = super().__matmul__(V)
        return out * float("nan") if self.num_matvecs > self.n else out


def test_nonfinite_product_mid_lanczos_is_failed():
    case = get_case("mlp")
    ctx = make_ctx(case)
    op = _NaNAfter(torch.diag(torch.arange(1.0, 21.0, dtype=F64)), n=3)
    ctx.curvature = lambda kind="hessian", params=None: op
    d = HessianTop(k=2)
    out = d.compute(ctx)
    assert out.status == "failed" and out.records == []
    assert "non-finite" in out.reason
    assert "all" not in d.vectors  # a failed probe leaves no warm start behind


def test_eigenspace_is_published_through_the_step_context():
    case = get_case("mlp")
    ctx = make_ctx(case, step=7)
    assert ctx.top_eigenspace("hessian", "all") is None  # a reader that ran first finds nothing
    d = HessianTop(k=2, tol=1e-8)
    d.compute(ctx)
    space = ctx.top_eigenspace("hessian", "all")
    assert ctx.top_eigenspace("ggn", "all") is None
    assert space.step == 7 and space.eigenvectors.shape[1] == 2
    assert list(space.param_names) == names(case.model)


# --- hessian_density ------------------------------------------------------------------------------------
def test_density_nodes_and_weights_are_a_quadrature_of_the_dense_spectrum():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    P = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    d = HessianDensity(num_probes=3, steps=8, seed=5)
    out = d.compute(make_ctx(case))
    nodes, weights = values(out, "hessian_density_node"), values(out, "hessian_density_weight")
    assert len(nodes) == len(weights) == 3 * 8
    w = torch.tensor(weights, dtype=F64).reshape(3, 8)
    th = torch.tensor(nodes, dtype=F64).reshape(3, 8)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=F64))
    assert float(th.min()) >= float(ev[0]) - 1e-8 and float(th.max()) <= float(ev[-1]) + 1e-8
    # sum_j w_j theta_j = z^T H z / ||z||^2 for each Rademacher probe z: the quadrature's first moment.
    from diagnostics.linalg.operator import rademacher_probes

    Z = rademacher_probes(P, 0, 3, 5)
    quad = (Z * (H @ Z)).sum(0) / P
    torch.testing.assert_close((w * th).sum(1), quad, rtol=1e-8, atol=1e-12)


def test_density_budget_truncates_steps_and_flags_it():
    case = get_case("mlp")
    out = HessianDensity(num_probes=2, steps=16, max_matvecs=10).compute(make_ctx(case))
    assert out.status == "not_converged" and out.num_matvecs <= 10
    assert len(values(out, "hessian_density_node")) == 2 * 5


# --- hessian_trace --------------------------------------------------------------------------------------------
def test_trace_is_exact_when_the_sketch_spans_the_space():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    P = H.shape[0]
    out = HessianTrace(num_matvecs=3 * P + 6).compute(make_ctx(case))
    assert values(out, "hessian_trace")[0] == pytest.approx(float(H.trace()), rel=1e-9, abs=1e-10)
    assert values(out, "hessian_trace_stderr")[0] == pytest.approx(0.0, abs=1e-8)


def test_trace_estimate_is_unbiased_within_its_stderr():
    case = medium_case()
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    out = HessianTrace(num_matvecs=60, seed=3).compute(make_ctx(case))
    mean, se = values(out, "hessian_trace")[0], values(out, "hessian_trace_stderr")[0]
    assert abs(mean - float(H.trace())) <= 5 * se + 1e-9


# --- registry and options ------------------------------------------------------------------------------------
def test_presets_and_schedules():
    std, full = preset_names("standard"), preset_names("full")
    assert {"hessian_top", "sharpness"} <= set(std)
    assert not {"hessian_density", "hessian_trace", "grad_subspace"} & set(std)
    assert {"hessian_top", "sharpness", "hessian_density", "hessian_trace", "grad_subspace"} <= set(full)
    assert HessianTop().every == 1000 and HessianTop(every=7).is_due(14)


def test_bad_options_raise_config_errors_naming_the_option():
    with pytest.raises(ConfigError, match="kind"):
        HessianTop(kind="fisher")
    with pytest.raises(ConfigError, match="k must be"):
        HessianTop(k=0)
    with pytest.raises(ConfigError, match="max_matvecs"):
        HessianTop(max_matvecs=0)
    with pytest.raises(ConfigError, match="params"):
        HessianTop(params=3)
    with pytest.raises(ConfigError, match="num_matvecs"):
        HessianTrace(num_matvecs=2)
    assert parse_blocks(None, "x") == {"all": None}
    assert parse_blocks(["a.*", "b"], "x") == {"a.*": ("a.*",), "b": ("b",)}
    assert parse_blocks({"head": "fc.*"}, "x") == {"head": ("fc.*",)}


def test_monitor_round_trip_and_state_isolation(tmp_path):
    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    diags = [HessianTop(every=1, bottom=True), HessianDensity(every=2, num_probes=2, steps=4),
             HessianTrace(every=2, num_matvecs=12)]
    with Monitor(case.model, case.loss_fn, run=tmp_path / "run", diagnostics=diags, optimizer=opt,
                 probe_data=case.batches, num_classes=3, strict=True, check_isolation=True) as mon:
        _train(mon, case, opt, 3)
    run = open_run(tmp_path / "run")
    s = run.series()
    assert set(s[s.metric == "hessian_eigenvalue"].step) == {0, 1, 2}
    assert set(s[s.metric == "hessian_trace"].step) == {0, 2}
    assert s.value.map(math.isfinite).all()
    assert set(run.status().status) == {"ok"}


def test_bottom_run_shares_the_blocks_budget():
    case = medium_case()
    out = HessianTop(k=4, tol=1e-10, bottom=True, max_matvecs=40, resume=False).compute(make_ctx(case))
    assert out.num_matvecs <= 40
    assert out.status == "not_converged"


# --- hessian_density cut into calls --------------------------------------------------------------------------

def _cut_ctx(case, step: int, name: str = "hessian_density") -> StepContext:
    ctx = make_ctx(case, step=step)
    ctx.probe_seconds, ctx.sliced = 1e-12, frozenset({name})  # one batched product per call
    return ctx


def test_a_density_probe_cut_into_calls_is_the_quadrature_of_the_step_it_began():
    from diagnostics.linalg import spectral_density

    case = medium_case()
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    ref = spectral_density(H, num_probes=3, steps=12, seed=5)
    d = HessianDensity(num_probes=3, steps=12, seed=5)
    outs = []
    for step in range(40):
        out = d.compute(_cut_ctx(case, step))
        outs.append(out)
        _nudge(case.model, step)  # training moves on between calls
        if out.status != "continues":
            break
    assert len(outs) == 12 and all(o.num_matvecs == 3 for o in outs)  # one batched product of 3 probes a call
    assert all(o.status == "continues" and not o.records and "probe of step 0" in o.reason for o in outs[:-1])
    last = outs[-1]
    assert last.status == "ok" and values(last, "hessian_density_probe_step") == [0.0] and not d.unfinished_run
    nodes = torch.tensor(values(last, "hessian_density_node"), dtype=F64).reshape(3, 12)
    weights = torch.tensor(values(last, "hessian_density_weight"), dtype=F64).reshape(3, 12)
    assert torch.allclose(nodes, ref.nodes, rtol=1e-7, atol=1e-9)  # step 0's Hessian, not the last call's
    assert torch.allclose(weights, ref.weights, rtol=1e-6, atol=1e-9)


def test_a_trace_probe_cut_into_calls_is_the_estimate_of_the_step_it_began():
    from diagnostics.linalg import hutchpp_trace

    case = medium_case()
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    ref = hutchpp_trace(H, num_matvecs=30, seed=5, block_size=4)
    d = HessianTrace(num_matvecs=30, seed=5)
    outs = []
    for step in range(40):
        out = d.compute(_cut_ctx(case, step, "hessian_trace"))
        outs.append(out)
        _nudge(case.model, step)
        if out.status != "continues":
            break
    # 10 sketch columns, 10 on the sketch, 10 residual probes: 3 + 3 + 3 products of at most 4.
    assert len(outs) == 9 and sum(o.num_matvecs for o in outs) == 30
    assert all(o.status == "continues" and not o.records and "probe of step 0" in o.reason for o in outs[:-1])
    last = outs[-1]
    assert last.status == "ok" and values(last, "hessian_trace_probe_step") == [0.0] and not d.unfinished_run
    assert values(last, "hessian_trace")[0] == pytest.approx(ref.mean, rel=1e-8)  # step 0's Hessian
    assert values(last, "hessian_trace_stderr")[0] == pytest.approx(ref.stderr, rel=1e-6)
    # Outside the budget's cut (or with resume=False) the estimate is whole and shared through ctx.trace.
    whole = HessianTrace(num_matvecs=30, seed=5, resume=False).compute(_cut_ctx(case, 50, "hessian_trace"))
    assert whole.status == "ok" and whole.num_matvecs == 30 and not values(whole, "hessian_trace_probe_step")


def test_density_within_max_memory_keeps_the_exact_moments_and_says_how_it_fit():
    case = medium_case()
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    P = H.shape[0]
    d = HessianDensity(num_probes=3, steps=20, seed=5, max_memory=(4 + 3) * P * 8)  # 4 vectors + workspace
    out = d.compute(make_ctx(case))
    assert out.status == "ok" and out.num_matvecs == 60
    quad = out.settings["quadrature"]
    assert quad["probe_group"] == 1 and quad["basis_vectors"] == 4 and quad["basis_dtype"] == "float64"
    assert quad["reorthogonalization"] == "against the latest 4 vectors" and quad["within_memory_budget"]
    nodes = torch.tensor(values(out, "hessian_density_node"), dtype=F64).reshape(3, 20)
    weights = torch.tensor(values(out, "hessian_density_weight"), dtype=F64).reshape(3, 20)
    from diagnostics.linalg.operator import rademacher_probes

    Z = rademacher_probes(P, 0, 3, 5) / math.sqrt(P)
    scale = float(torch.linalg.eigvalsh(H).abs().max())
    Hk = torch.eye(P, dtype=F64)
    for k in range(1, 7):  # the quadrature of step 0's Hessian: z^T H^k z for each probe
        Hk = Hk @ H
        exact = torch.einsum("pi,pq,qi->i", Z, Hk, Z)
        assert torch.allclose((weights * nodes**k).sum(1), exact, rtol=0, atol=1e-9 * scale**k), k
    with pytest.raises(ConfigError, match="max_memory must be a positive"):
        HessianDensity(max_memory=0)


def test_a_density_probe_is_not_cut_without_resume_or_outside_the_budgets_slices():
    case = medium_case()
    whole = HessianDensity(num_probes=2, steps=6, resume=False).compute(_cut_ctx(case, 0))
    assert whole.status == "ok" and whole.num_matvecs == 12
    ctx = _cut_ctx(case, 0, name="hessian_top")  # the budget does not carry this diagnostic's runs
    assert HessianDensity(num_probes=2, steps=6).compute(ctx).status == "ok"
    d = HessianDensity(num_probes=2, steps=6)
    assert d.compute(_cut_ctx(case, 0)).status == "continues" and d.unfinished_run
    d.drop_unfinished()
    assert not d.unfinished_run


def test_curvature_probes_share_the_monitors_basis_memory_and_it_is_freed_at_close(tmp_path):
    case = medium_case()
    opt = torch.optim.SGD(case.model.parameters(), lr=0.01)
    top, sharp = HessianTop(every=1, k=3, tol=1e-6), get_diagnostic("sharpness", every=1, tol=1e-6)
    density = HessianDensity(every=1, num_probes=2, steps=8)
    held = []
    with Monitor(case.model, case.loss_fn, run=tmp_path / "run", diagnostics=[top, sharp, density], optimizer=opt,
                 probe_data=case.batches, num_classes=4, strict=True) as mon:
        def after(step: int) -> None:
            assert top.basis is sharp.basis is not None
            held.append(top.basis.nbytes)

        _train(mon, case, opt, 3, after)
    # One basis of 40 vectors for all (float64 operator: 8 bytes a value, P = 212; the density's 2 x 8 fit in
    # it), kept from step to step.
    P = sum(p.numel() for p in case.model.parameters())
    assert held == [40 * P * 8] * 3
    assert top.basis.reuses >= 8  # every run after the first (at least one per diagnostic and step)
    assert top.basis.nbytes == 0  # freed at close
    assert len(open_run(tmp_path / "run").series("hessian_eigenvalue").step.unique()) == 3
    alone = HessianTop(keep_basis=False, k=3)
    alone.compute(make_ctx(case))
    assert alone.basis is None and alone.settings()["keep_basis"] is False


def test_a_kept_basis_changes_no_eigenvalue():
    case = medium_case()
    kept, fresh = HessianTop(k=3, tol=1e-9, max_matvecs=None), HessianTop(k=3, tol=1e-9, max_matvecs=None,
                                                                         keep_basis=False)
    ws = BasisWorkspace()
    for step in range(2):
        ctx = make_ctx(case, step=step)
        ctx.basis_workspace = ws
        a, b = kept.compute(ctx), fresh.compute(make_ctx(case, step=step))
        assert values(a, "hessian_eigenvalue") == values(b, "hessian_eigenvalue")
        _nudge(case.model, step)
    assert ws.nbytes > 0
