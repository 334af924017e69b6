"""sharpness: lambda_max against 2/lr (and momentum variants), Adam's preconditioned sharpness, Tr(H) lr/2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.metrics.context import StepContext
from diagnostics.metrics.sharpness import Sharpness, adam_preconditioner, optimizer_family, sgd_threshold
from diagnostics.metrics.stability import adam_settling
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from tests.cases import get_case
from tests.reference import dense_hessian

F64 = torch.float64


def make_ctx(case, optimizer=None, step: int = 0) -> StepContext:
    return StepContext(step=step, model=case.model, loss_fn=case.loss_fn, batch=case.batches[0], loss=None,
                       optimizer=optimizer, probe_data=case.batches, num_classes=3)


def value(out, metric: str, key: str = "all") -> float:
    (v,) = [r.value for r in out.records if r.metric == metric and r.key == key]
    return v


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def train_steps(case, opt, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        case.loss_fn(case.model, case.batches[0]).backward()
        opt.step()


def test_sgd_sharpness_threshold_ratio_and_trace_ratio_equal_dense():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    lam, P = float(torch.linalg.eigvalsh(H)[-1]), H.shape[0]
    lr = 0.3
    opt = torch.optim.SGD(case.model.parameters(), lr=lr)
    out = Sharpness(tol=1e-10, max_matvecs=None, trace=True, trace_matvecs=3 * P + 6).compute(make_ctx(case, opt))
    assert out.status == "ok"
    assert value(out, "sharpness") == pytest.approx(lam, rel=1e-8)
    assert value(out, "stability_threshold") == pytest.approx(2 / lr)
    assert value(out, "sharpness_ratio") == pytest.approx(lam * lr / 2, rel=1e-8)
    assert value(out, "trace_ratio") == pytest.approx(float(H.trace()) * lr / 2, rel=1e-8)
    assert not any(r.metric.startswith("adam_") for r in out.records)


def test_momentum_thresholds_match_pytorch_sgd_on_a_quadratic():
    """The threshold is where torch.optim.SGD on 0.5 * lam * x^2 switches from converging to diverging."""

    def final(lam: float, **kw) -> float:
        x = torch.nn.Parameter(torch.tensor([1.0], dtype=F64))
        opt = torch.optim.SGD([x], **kw)
        for _ in range(600):
            opt.zero_grad()
            (0.5 * lam * x.square().sum()).backward()
            opt.step()
        return float(x.detach().abs())

    for kw in ({"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.5, "dampening": 0.3},
               {"lr": 0.1, "momentum": 0.9, "nesterov": True}):
        thr = sgd_threshold(kw["lr"], kw.get("momentum", 0.0), kw.get("dampening", 0.0), kw.get("nesterov", False))
        assert final(thr * 0.95, **kw) < 1e-2, kw
        assert final(thr * 1.05, **kw) > 1e2, kw


def test_sgd_momentum_threshold_is_used():
    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.9)
    out = Sharpness(trace=False).compute(make_ctx(case, opt))
    assert value(out, "stability_threshold") == pytest.approx(38.0 / 0.1 / 10 * 1.0)  # 2(1+0.9)/0.1 = 38


def dense_adam_sharpness(case, opt, source: str = "next_step") -> tuple[float, float]:
    """lambda_max(P^{-1/2} (H + wd I) P^{-1/2}) with P = diag(sqrt(v_hat) + eps) as torch.optim computes it.

    ``"next_step"``: run the coming step on copies of the model and optimizer and read P from the state it
    leaves (the state after the step is what the step used); ``"state"``: v / (1 - beta2^t) as stored.
    """
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    state_opt, params = opt, list(case.model.parameters())
    if source == "next_step":
        model = copy.deepcopy(case.model)
        params = list(model.parameters())
        for q, p in zip(params, case.model.parameters()):
            q.grad = p.grad.clone()
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [params[i] for i, p in enumerate(case.model.parameters()) if any(p is x for x in g["params"])]}
                  for g in opt.param_groups]
        state_opt = type(opt)(groups)
        state_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares the tensors
        state_opt.step()
    d, wd = [], []
    for p in params:
        st = state_opt.state[p]
        g = next(g for g in state_opt.param_groups if any(q is p for q in g["params"]))
        t = float(st["step"])
        v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
        v_hat = v.reshape(-1).to(F64) / (1 - b2**t)
        d.append((v_hat.sqrt() + g["eps"]) * group["lr"] / g["lr"])
        coupled = g["weight_decay"] and not g.get("decoupled_weight_decay")
        wd.append(torch.full((p.numel(),), g["weight_decay"] if coupled else 0.0, dtype=F64))
    s = torch.cat(d).rsqrt()
    M = s[:, None] * (H + torch.diag(torch.cat(wd))) * s[None, :]
    return float(torch.linalg.eigvalsh(M)[-1]), (2 + 2 * b1) / ((1 - b1) * group["lr"])


def fresh_gradient(case) -> None:
    """The gradient of the coming step, as the Monitor sees it between backward() and optimizer.step()."""
    case.model.zero_grad()
    case.loss_fn(case.model, case.batches[0]).backward()


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.1}),
                                    (torch.optim.Adam, {"amsgrad": True}), (torch.optim.Adam, {"weight_decay": 0.5})])
def test_adam_preconditioned_sharpness_uses_the_coming_steps_v_hat(cls, kw):
    case = get_case("mlp")
    opt = cls(case.model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6, **kw)
    train_steps(case, opt, 5)
    fresh_gradient(case)
    ref, thr = dense_adam_sharpness(case, opt)
    out = Sharpness(tol=1e-10, max_matvecs=None).compute(make_ctx(case, opt))
    assert optimizer_family(opt) == "adam" and out.settings["adam_preconditioner"] == "next_step"
    assert value(out, "adam_sharpness") == pytest.approx(ref, rel=1e-7)
    assert value(out, "adam_threshold") == pytest.approx(thr) and thr == pytest.approx(38 / 0.01)
    assert value(out, "adam_sharpness_ratio") == pytest.approx(ref / thr, rel=1e-7)
    assert "sharpness_ratio" not in {r.metric for r in out.records}  # 2/lr is not Adam's threshold
    stale, _ = dense_adam_sharpness(case, opt, source="state")
    old = Sharpness(tol=1e-10, max_matvecs=None, preconditioner="state").compute(make_ctx(case, opt))
    assert value(old, "adam_sharpness") == pytest.approx(stale, rel=1e-7)
    assert old.settings["adam_preconditioner"] == "state"


def test_adam_with_per_group_learning_rates_folds_their_ratio_into_p():
    case = get_case("mlp")
    first, second = list(case.model[0].parameters()), list(case.model[2].parameters())
    opt = torch.optim.Adam([{"params": first}, {"params": second, "lr": 0.003}], lr=0.01)
    train_steps(case, opt, 4)
    fresh_gradient(case)
    ref, thr = dense_adam_sharpness(case, opt)
    out = Sharpness(tol=1e-10, max_matvecs=None, trace=False).compute(make_ctx(case, opt))
    assert value(out, "adam_sharpness") == pytest.approx(ref, rel=1e-7)


def test_adam_before_its_first_step_uses_the_first_gradient():
    case = get_case("mlp")
    opt = torch.optim.Adam(case.model.parameters(), lr=0.01)
    fresh_gradient(case)
    ref, _ = dense_adam_sharpness(case, opt)  # v_hat_1 = g_1^2
    out = Sharpness(tol=1e-10, max_matvecs=None).compute(make_ctx(case, opt))
    assert value(out, "adam_sharpness") == pytest.approx(ref, rel=1e-7)


def test_adam_threshold_is_the_heavy_ball_threshold_of_its_momentum_form():
    """With P frozen, Adam is heavy ball on P^{-1/2} H P^{-1/2} with momentum beta1 and dampening beta1."""
    for b1 in (0.0, 0.5, 0.9):
        assert sgd_threshold(0.01, b1, b1) == pytest.approx((2 + 2 * b1) / ((1 - b1) * 0.01))


@pytest.mark.parametrize("make", [lambda ps: torch.optim.NAdam(ps, lr=0.01), lambda ps: torch.optim.RMSprop(ps, lr=0.01),
                                  lambda ps: torch.optim.Adagrad(ps, lr=0.01),
                                  lambda ps: type("MySGD", (torch.optim.SGD,), {})(ps, lr=0.01)])
def test_optimizers_outside_the_whitelist_get_sharpness_and_a_reason(make):
    case = get_case("mlp")
    opt = make(case.model.parameters())
    train_steps(case, opt, 2)
    out = Sharpness(trace=False).compute(make_ctx(case, opt))
    assert optimizer_family(opt) == "unsupported"
    assert {r.metric for r in out.records} == {"sharpness"} and out.status == "ok"
    assert f"no stability threshold for {type(opt).__name__}" in out.reason


def test_sgd_weight_decay_shifts_the_curvature_and_mixed_groups_have_no_threshold():
    case = get_case("mlp")
    lam = Sharpness(trace=False, tol=1e-10, max_matvecs=None).compute(make_ctx(case)).records[0].value
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.3)
    out = Sharpness(trace=False, tol=1e-10, max_matvecs=None).compute(make_ctx(case, opt))
    assert value(out, "sharpness") == pytest.approx(lam, rel=1e-8)
    assert value(out, "sharpness_ratio") == pytest.approx((lam + 0.3) / (2 * 1.5 / 0.1), rel=1e-8)
    mixed = torch.optim.SGD([{"params": case.model[0].parameters()},
                             {"params": case.model[2].parameters(), "momentum": 0.9}], lr=0.1)
    out = Sharpness(trace=False).compute(make_ctx(case, mixed))
    assert {r.metric for r in out.records} == {"sharpness"} and "differ in momentum" in out.reason


def test_adam_before_its_first_step_records_raw_sharpness_only():
    case = get_case("mlp")
    opt = torch.optim.Adam(case.model.parameters(), lr=0.01)
    out = Sharpness().compute(make_ctx(case, opt))
    assert {r.metric for r in out.records} == {"sharpness"}
    assert "no Adam state" in out.reason
    s, _, why = adam_preconditioner(opt, dict(case.model.named_parameters()), names(case.model), 0.01)
    assert why is not None


def test_without_optimizer_or_lr_only_sharpness_and_with_lr_option_the_ratio():
    case = get_case("mlp")
    out = Sharpness(trace=False).compute(make_ctx(case))
    assert {r.metric for r in out.records} == {"sharpness"} and "no learning rate" in out.reason
    out = Sharpness(trace=False, lr=0.2).compute(make_ctx(case))
    assert value(out, "stability_threshold") == pytest.approx(10.0)


def test_edge_of_stability_events_remember_the_side():
    case = get_case("mlp")
    lam = Sharpness(trace=False).compute(make_ctx(case)).records[0].value
    d = Sharpness(trace=False, hysteresis=0.1)

    def probe(ratio: float, step: int):
        opt = torch.optim.SGD(case.model.parameters(), lr=2 * ratio / lam)
        out = d.compute(make_ctx(case, opt, step=step))
        assert value(out, "sharpness_ratio") == pytest.approx(ratio, rel=1e-3)
        return [e for e in out.events if e.kind == "edge_of_stability"]

    assert probe(0.5, 0) == []
    (up,) = probe(1.05, 1)
    assert up.severity == "warning" and up.data["direction"] == "up" and up.metric == "sharpness_ratio"
    assert probe(1.1, 2) == []  # still above: no new event
    assert probe(0.95, 3) == []  # hovering just below 1: within the hysteresis band
    assert probe(1.02, 4) == []
    (down,) = probe(0.8, 5)
    assert down.severity == "info" and down.data["direction"] == "down"
    assert d.state["side"] == {"sharpness_ratio/all": "below"}


def test_monitor_records_the_crossing_event_and_warm_starts(tmp_path):
    case = get_case("mlp")
    lam = Sharpness(trace=False).compute(make_ctx(case)).records[0].value
    opt = torch.optim.SGD(case.model.parameters(), lr=2.5 / lam)  # ratio about 1.25 from the start
    d = Sharpness(every=1, trace=False)
    with Monitor(case.model, case.loss_fn, run=tmp_path / "run", diagnostics=[d], optimizer=opt,
                 probe_data=case.batches, strict=True, check_isolation=True) as mon:
        for step in range(3):
            opt.zero_grad()
            loss = case.loss_fn(case.model, case.batches[0])
            loss.backward()
            mon.step(step, case.batches[0], loss)  # no optimizer step: the model stays where it is
    run = open_run(tmp_path / "run")
    ev = run.events()
    assert list(ev.kind) == ["edge_of_stability"] and ev.iloc[0].step == 0
    assert {"sharpness", "stability_threshold", "sharpness_ratio"} <= set(run.series().metric)
    mv = run.status().num_matvecs.tolist()
    assert mv[2] < mv[0]  # the warm start from the previous probe's vector needs fewer products


def test_budget_and_nonfinite():
    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    out = Sharpness(trace=False, tol=1e-14, max_matvecs=3, resume=False).compute(make_ctx(case, opt))
    assert out.status == "not_converged" and out.num_matvecs <= 3
    d = Sharpness(trace=False, tol=1e-14, max_matvecs=3)
    out = d.compute(make_ctx(case, opt))  # resumed: nothing stored until the run ends
    assert out.status == "continues" and out.records == [] and out.num_matvecs == 3 and d.unfinished_run
    with torch.no_grad():
        case.model[0].bias[0] = float("nan")
    out = Sharpness().compute(make_ctx(case, opt))
    assert out.status == "failed" and out.records == [] and out.reason


def test_bad_options():
    with pytest.raises(ConfigError, match="lr"):
        Sharpness(lr=-1.0)
    with pytest.raises(ConfigError, match="hysteresis"):
        Sharpness(hysteresis=1.5)
    with pytest.raises(ConfigError, match="trace_matvecs"):
        Sharpness(trace_matvecs=2)


def test_trace_auto_reuses_hessian_trace_of_the_step_and_is_otherwise_skipped():
    from diagnostics.metrics.curvature import HessianTrace

    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.2)
    ctx = make_ctx(case, opt)
    tr = HessianTrace(num_matvecs=60).compute(ctx)
    out = Sharpness().compute(ctx)  # trace="auto", same num_matvecs and seed: the cached estimate
    assert value(out, "trace_ratio") == pytest.approx(tr.records[0].value * 0.2 / 2, rel=1e-12)
    alone = Sharpness().compute(make_ctx(case, opt))
    assert "trace_ratio" not in {r.metric for r in alone.records}
    assert alone.num_matvecs == out.num_matvecs  # no Hutch++ products spent in either: Lanczos only
    with pytest.raises(ConfigError, match="trace"):
        Sharpness(trace="sometimes")


# --- probes spread over calls ------------------------------------------------------------------------------
def _spread(d: Sharpness, case, opt, lrs) -> list:
    """Call ``d`` at steps 0, 1, ... with a training step between calls (each with its own lr) until the
    probe ends; returns the outputs."""
    outs = []
    for step, lr in enumerate(lrs):
        fresh_gradient(case)
        out = d.compute(make_ctx(case, opt, step=step))
        outs.append(out)
        if out.status != "continues":
            return outs
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()  # the parameters, the Adam state and the learning rate all move on
    raise AssertionError("the probe did not end")


def test_a_capped_sgd_probe_resumes_and_ends_with_the_curvature_and_threshold_of_its_first_step():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    lam = float(torch.linalg.eigvalsh(H)[-1])
    opt = torch.optim.SGD(case.model.parameters(), lr=0.3, momentum=0.9)
    d = Sharpness(tol=1e-10, max_matvecs=2, trace=False)
    outs = _spread(d, case, opt, [0.5, 0.05, 0.2] * 20)
    assert len(outs) > 2 and all(o.num_matvecs <= 2 for o in outs)
    assert all(o.status == "continues" and not o.records and "probe of step 0" in o.reason for o in outs[:-1])
    last = outs[-1]
    assert last.status == "ok" and not d.unfinished_run
    assert value(last, "sharpness") == pytest.approx(lam, rel=1e-8)  # the Hessian of step 0
    assert value(last, "stability_threshold") == pytest.approx(sgd_threshold(0.3, momentum=0.9))  # step 0's lr
    assert value(last, "sharpness_probe_step") == 0.0
    whole = Sharpness(tol=1e-10, max_matvecs=None, trace=False, warm_start=False)
    case0 = get_case("mlp")
    ref = whole.compute(make_ctx(case0, torch.optim.SGD(case0.model.parameters(), lr=0.3, momentum=0.9)))
    assert sum(o.num_matvecs for o in outs) == ref.num_matvecs  # the products of one whole probe


def test_a_capped_adam_probe_keeps_the_preconditioner_of_its_first_step():
    case = get_case("mlp")
    opt = torch.optim.Adam(case.model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    train_steps(case, opt, 3)
    fresh_gradient(case)
    ref, thr = dense_adam_sharpness(case, opt)
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    lam = float(torch.linalg.eigvalsh(H)[-1])
    d = Sharpness(tol=1e-10, max_matvecs=3)
    outs = _spread(d, case, opt, [0.02, 0.005] * 30)
    assert len(outs) > 2 and all(o.status == "continues" for o in outs[:-1])
    last = outs[-1]
    assert last.status == "ok" and last.settings["adam_preconditioner"] == "next_step"
    assert value(last, "sharpness") == pytest.approx(lam, rel=1e-8)
    assert value(last, "adam_sharpness") == pytest.approx(ref, rel=1e-7)
    assert value(last, "adam_threshold") == pytest.approx(thr)
    assert value(last, "sharpness_probe_step") == 0.0


def test_a_probe_that_ends_in_its_first_call_stores_no_probe_step():
    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    out = Sharpness(tol=1e-10, max_matvecs=None).compute(make_ctx(case, opt))
    assert out.status == "ok" and "sharpness_probe_step" not in {r.metric for r in out.records}


def test_a_crossing_found_by_a_spread_probe_names_the_step_it_measured():
    case = get_case("mlp")
    H = dense_hessian(case.model, case.loss_fn, case.batches, names(case.model))
    lam = float(torch.linalg.eigvalsh(H)[-1])
    opt = torch.optim.SGD(case.model.parameters(), lr=2.5 / lam)  # above the edge at step 0
    outs = _spread(Sharpness(tol=1e-10, max_matvecs=2, trace=False), case, opt, [1e-4] * 60)
    (ev,) = outs[-1].events
    assert ev.kind == "edge_of_stability" and ev.data["probe_step"] == 0
    assert f"at step 0 (a probe that ended at step {len(outs) - 1})" in ev.message


def test_the_budget_cuts_sharpness_only_where_it_carries_its_runs_on():
    """Its calls are cut only when ``ctx.sliced`` names it (the budget then carries its run on)."""
    case = get_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    ctx = make_ctx(case, opt)
    ctx.probe_seconds, ctx.sliced = 1e-12, frozenset({"hessian_trace"})
    out = Sharpness(tol=1e-10, max_matvecs=None).compute(ctx)
    assert out.status == "ok"
    ctx = make_ctx(case, opt)
    ctx.probe_seconds, ctx.sliced = 1e-12, frozenset({"sharpness"})
    d = Sharpness(tol=1e-10, max_matvecs=None)
    out = d.compute(ctx)
    assert out.status == "continues" and out.num_matvecs == 1 and "s per call" in out.reason


def _set_adam_step(opt, t: float) -> None:
    for st in opt.state.values():
        st["step"] = torch.tensor(float(t))


def test_adam_settling_ends_when_the_newest_gradient_weighs_at_most_a_tenth_of_v_hat():
    case = get_case("mlp")
    params = dict(case.model.named_parameters())
    opt = torch.optim.Adam(case.model.parameters(), lr=0.01, betas=(0.9, 0.95))
    train_steps(case, opt, 1)
    # beta2 = 0.95: the weight 0.05 / (1 - 0.95^t) is 0.1027 at t = 13 and 0.0976 at t = 14.
    _set_adam_step(opt, 12)  # the coming step is t = 13
    why = adam_settling(opt, params, names(case.model), coming=True)
    assert why is not None and "step 13" in why and "0.10 in v_hat" in why
    assert adam_settling(opt, params, names(case.model), coming=False) is not None  # t = 12, as stored
    _set_adam_step(opt, 13)
    assert adam_settling(opt, params, names(case.model), coming=True) is None
    # beta2 = 0.8: the newest gradient weighs at least 0.2 for ever, so twice that is the limit.
    opt.param_groups[0]["betas"] = (0.9, 0.8)
    _set_adam_step(opt, 2)
    assert adam_settling(opt, params, names(case.model), coming=True) is not None  # t = 3: 0.2 / 0.488 = 0.41
    _set_adam_step(opt, 3)
    assert adam_settling(opt, params, names(case.model), coming=True) is None  # t = 4: 0.2 / 0.590 = 0.34


def test_no_adam_edge_of_stability_event_while_the_preconditioner_settles():
    """At Adam's first step v_hat is one squared gradient and the preconditioned sharpness is far above the
    threshold; the ratio is stored, the crossing is not announced. Once v_hat has settled the same
    diagnostic announces a crossing (the control)."""
    case = get_case("mlp")
    opt = torch.optim.Adam(case.model.parameters(), lr=5.0, betas=(0.9, 0.95))
    d = Sharpness(tol=1e-8, trace=False)
    fresh_gradient(case)
    first = d.compute(make_ctx(case, opt, step=0))
    assert value(first, "adam_sharpness_ratio") > 1.0
    assert not [e for e in first.events if e.kind == "edge_of_stability"]
    assert "still settling at its step 1" in first.reason and first.status == "ok"
    for group in opt.param_groups:
        group["lr"] = 1e-4
    train_steps(case, opt, 13)
    for group in opt.param_groups:
        group["lr"] = 5.0
    fresh_gradient(case)
    later = d.compute(make_ctx(case, opt, step=13))
    assert value(later, "adam_sharpness_ratio") > 1.0
    (up,) = [e for e in later.events if e.kind == "edge_of_stability"]
    assert up.metric == "adam_sharpness_ratio" and up.data["direction"] == "up"
    assert later.reason is None or "settling" not in later.reason
