"""GSNR, gradient noise scale and rank diagnostics against brute-force references (float64)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.metrics import get_diagnostic
from diagnostics.metrics.base import Output
from diagnostics.store.records import expand_records
from diagnostics.tracking import StepContext


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def setup(n: int = 8) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.3), nn.Linear(4, 2)).double()
    batch = (torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,)))
    return model, batch


def records(out: Any) -> dict[tuple[str, str], float]:
    assert isinstance(out, Output) and out.status == "ok", out
    return {(r.metric, r.key): r.value for r in expand_records(out.records)}


def loop_grads(model: nn.Module, samples: list[Any]) -> list[dict[str, torch.Tensor]]:
    out = []
    params = dict(model.named_parameters())
    for s in samples:
        gs = torch.autograd.grad(loss_fn(model, s), list(params.values()))
        out.append({n: g for n, g in zip(params, gs)})
    return out


def brute_gsnr(grads: list[dict[str, torch.Tensor]], corrected: bool = True) -> dict[str, torch.Tensor]:
    """(m^2 - s^2/N) / s^2 with the unbiased variance; the raw m^2 / population variance otherwise."""
    from diagnostics.gradients import GSNR_EPS

    out = {}
    for name in grads[0]:
        g = torch.stack([d[name] for d in grads])
        n = g.shape[0]
        if corrected:
            s2 = g.var(0, unbiased=True)
            out[name] = (g.mean(0) ** 2 - s2 / n) / torch.clamp(s2, min=GSNR_EPS)
        else:
            out[name] = g.mean(0) ** 2 / torch.clamp(g.var(0, unbiased=False), min=GSNR_EPS)
    return out


def check_summary(rec: dict[tuple[str, str], float], prefix: str, ratios: dict[str, torch.Tensor]) -> None:
    for name, r in ratios.items():
        assert math.isclose(rec[(f"{prefix}_mean", name)], float(r.mean()), rel_tol=1e-9)
        assert math.isclose(rec[(f"{prefix}_median", name)], float(torch.quantile(r.flatten(), 0.5)), rel_tol=1e-9)
    pooled = torch.cat([r.flatten() for r in ratios.values()])
    assert math.isclose(rec[(f"{prefix}_mean", "all")], float(pooled.mean()), rel_tol=1e-9)


def test_gsnr_matches_per_sample_loop_in_eval_mode() -> None:
    model, batch = setup()
    model.train()
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    rec = records(get_diagnostic("gsnr").compute(ctx))
    assert model.training  # eval only inside
    model.eval()
    samples = [(batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(8)]
    grads = loop_grads(model, samples)
    check_summary(rec, "gsnr", brute_gsnr(grads))
    check_summary(rec, "gsnr_raw", brute_gsnr(grads, corrected=False))
    flat = torch.stack([torch.cat([g.flatten() for g in d.values()]) for d in grads])
    mean = flat.mean(0)
    trace = ((flat - mean) ** 2).sum() / (8 - 1)
    g2 = mean.square().sum() - trace / 8
    # the first probe's running averages are the estimates themselves (debiased EMA)
    assert math.isclose(rec[("grad_noise_trace", "all")], float(trace), rel_tol=1e-9)
    assert math.isclose(rec[("grad_noise_sqnorm", "all")], float(g2), rel_tol=1e-9, abs_tol=1e-15)
    assert (("grad_noise_scale", "all") in rec) == (g2 > 0)
    if g2 > 0:
        assert math.isclose(rec[("grad_noise_scale", "all")], float(trace / g2), rel_tol=1e-9)


def test_gsnr_writes_each_statistics_parameter_values_as_one_vector() -> None:
    """One VectorRecord per statistic over the parameters, in the model's order, and a Record for "all"."""
    from diagnostics.store.records import Record, VectorRecord

    model, batch = setup()
    out = get_diagnostic("gsnr").compute(StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None))
    vectors = {r.metric: r for r in out.records if isinstance(r, VectorRecord)}
    assert set(vectors) == {"gsnr_mean", "gsnr_median", "gsnr_raw_mean", "gsnr_raw_median"}
    names = tuple(n for n, _ in model.named_parameters())
    assert all(v.keys == names and len(v.values) == len(names) for v in vectors.values())
    wholes = {r.metric for r in out.records if isinstance(r, Record) and r.key == "all"}
    assert set(vectors) <= wholes


def test_gsnr_uses_the_first_max_samples_samples() -> None:
    model, batch = setup(n=16)
    model.eval()
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    out = get_diagnostic("gsnr").compute(ctx)
    assert out.settings["num_samples"] == 8  # the default subsample
    first8 = [(batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(8)]
    check_summary(records(out), "gsnr", brute_gsnr(loop_grads(model, first8)))
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    out = get_diagnostic("gsnr", max_samples=None).compute(ctx)
    assert out.settings["num_samples"] == 16
    every = [(batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(16)]
    check_summary(records(out), "gsnr", brute_gsnr(loop_grads(model, every)))
    with pytest.raises(ConfigError, match="max_samples"):
        get_diagnostic("gsnr", max_samples=1)


def test_grad_noise_scale_is_the_ratio_of_running_averages_kept_in_state() -> None:
    from diagnostics.gradients import gradient_noise_parts

    d = get_diagnostic("gsnr", noise_ema=0.5, max_samples=None)
    parts = []
    for step, seed in enumerate((0, 1, 2)):
        model, batch = setup(n=16)
        torch.manual_seed(seed)
        batch = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))
        ctx = StepContext(step=step, model=model, loss_fn=loss_fn, batch=batch, loss=None)
        rec = records(d.compute(ctx))
        model.eval()
        parts.append(gradient_noise_parts(loop_grads_per_sample(model, batch)))
    w = [0.125, 0.25, 0.5]  # 0.5 * 0.5^(3-k), normalised by 1 - 0.5^3
    tr = sum(wi * p.trace for wi, p in zip(w, parts)) / 0.875
    g2 = sum(wi * p.sqnorm for wi, p in zip(w, parts)) / 0.875
    assert math.isclose(rec[("grad_noise_trace", "all")], tr, rel_tol=1e-9)
    assert math.isclose(rec[("grad_noise_sqnorm", "all")], g2, rel_tol=1e-9)
    assert d.state["noise"]["count"] == 3
    if g2 > 0:
        assert math.isclose(rec[("grad_noise_scale", "all")], tr / g2, rel_tol=1e-9)


def loop_grads_per_sample(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    grads = loop_grads(model, [(batch[0][i : i + 1], batch[1][i : i + 1]) for i in range(batch[0].shape[0])])
    return {n: torch.stack([g[n] for g in grads]) for n in grads[0]}


def test_microbatch_gsnr_matches_loop() -> None:
    model, batch = setup(n=12)
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    rec = records(get_diagnostic("gsnr_microbatch", num_microbatches=4).compute(ctx))
    model.eval()
    parts = [(batch[0][i * 3 : (i + 1) * 3], batch[1][i * 3 : (i + 1) * 3]) for i in range(4)]
    ref = {n: r * (4 - 3) / (4 - 1) for n, r in brute_gsnr(loop_grads(model, parts)).items()}
    check_summary(rec, "gsnr_microbatch", ref)
    with pytest.raises(ConfigError, match="at least 4"):
        get_diagnostic("gsnr_microbatch", num_microbatches=3)
    assert not any(k[0].startswith("gsnr_mean") for k in rec)


def test_gsnr_fails_cleanly_on_a_single_sample() -> None:
    model, batch = setup(n=1)
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    assert get_diagnostic("gsnr").compute(ctx).status == "failed"


def test_weight_and_grad_ranks_match_linalg() -> None:
    from diagnostics.linalg import effective_rank, stable_rank

    model, batch = setup()
    loss_fn(model, batch).backward()
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    w = {(r.metric, r.key): r.value for r in get_diagnostic("weight_rank").compute(ctx)}
    g = {(r.metric, r.key): r.value for r in get_diagnostic("grad_rank").compute(ctx)}
    for name in ("0.weight", "3.weight"):
        p = dict(model.named_parameters())[name]
        assert math.isclose(w[("weight_effective_rank", name)], effective_rank(p.detach().float()), rel_tol=1e-6)
        assert math.isclose(w[("weight_stable_rank", name)], stable_rank(p.detach().float()), rel_tol=1e-6)
        assert math.isclose(g[("grad_stable_rank", name)], stable_rank(p.grad.float()), rel_tol=1e-6)
    assert not any(k[1].endswith("bias") for k in w)


def test_activation_rank_on_budget_and_alpha_req_where_defined() -> None:
    from diagnostics.linalg import alpha_req, effective_rank

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 3))
    batch = (torch.randn(200, 80), torch.randint(0, 3, (200,)))
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    d = get_diagnostic("activation_rank", max_tokens=128, baseline_after=0)
    out = d.compute(ctx)
    rec = records(out)
    with torch.no_grad():
        h = model[0](batch[0][:128])
    assert math.isclose(rec[("activation_effective_rank", "0")], effective_rank(h), rel_tol=1e-5)
    fit = alpha_req(h)  # 64 features, 128 tokens: ranks 11..32
    assert (fit.first, fit.last) == (11, 32)
    assert math.isclose(rec[("activation_alpha_req", "0")], fit.alpha, rel_tol=1e-5)
    assert ("activation_alpha_req", "2") not in rec  # 3 features: no value, and the reason says why
    assert out.reason.startswith("alpha-ReQ not fitted for 1 layer(s): 2: ") and "min_ranks = 20" in out.reason
    assert d.settings()["alpha_req"]["ranks"] == [11, 100]
    assert d.baseline["0"] == rec[("activation_effective_rank", "0")]


def test_rank_collapse_event() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32))
    batch = (torch.randn(64, 20), torch.zeros(64, dtype=torch.long))
    ctx = StepContext(step=0, model=model, loss_fn=lambda m, b: m(b[0]).sum(), batch=batch, loss=None)
    d = get_diagnostic("activation_rank", baseline_after=0)
    assert d.compute(ctx).events == []
    with torch.no_grad():
        model[0].weight[1:] = 0.0
        model[0].bias.zero_()
    ctx = StepContext(step=1, model=model, loss_fn=lambda m, b: m(b[0]).sum(), batch=batch, loss=None)
    (event,) = d.compute(ctx).events
    assert event.kind == "rank_collapse" and event.key == "0"


def test_rank_collapse_waits_for_its_baseline_and_fires_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32))
    batch = (torch.randn(64, 20), torch.zeros(64, dtype=torch.long))

    def events_at(d, step):
        ctx = StepContext(step=step, model=model, loss_fn=lambda m, b: m(b[0]).sum(), batch=batch, loss=None)
        return d.compute(ctx).events

    d = get_diagnostic("activation_rank", baseline_after=10)
    full_rank = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight[1:] = 0.0
    assert events_at(d, 0) == []  # collapsed, but before the baseline window: no reference yet
    with torch.no_grad():
        model[0].weight.copy_(full_rank)
    assert events_at(d, 10) == []  # baseline taken here
    with torch.no_grad():
        model[0].weight[1:] = 0.0
        model[0].bias.zero_()
    assert [e.kind for e in events_at(d, 11)] == ["rank_collapse"]
    assert events_at(d, 12) == []  # still collapsed: one event per collapse


def test_microbatch_gsnr_reads_the_users_accumulation(tmp_path) -> None:
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    twin = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin))
    gen = torch.Generator().manual_seed(1)
    steps = [[(torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (3,), generator=gen))
              for _ in range(5)] for _ in range(2)]
    refs = []
    with Monitor(model, loss_fn, run=tmp_path / "run", diagnostics=["gsnr_microbatch", "loss"], optimizer=opt,
                 every={"gsnr_microbatch": 1}) as monitor:
        for step, parts in enumerate(steps):
            refs.append({n: r * (5 - 3) / (5 - 1) for n, r in brute_gsnr(loop_grads(model, parts)).items()})
            opt.zero_grad(set_to_none=True)
            for part in parts:
                (loss_fn(model, part) / len(parts)).backward()  # the usual scaled accumulation
                monitor.microbatch()
            monitor.step(step, parts[0], None)
            opt.step()
    for parts in steps:  # the same training without the Monitor
        twin_opt.zero_grad(set_to_none=True)
        for part in parts:
            (loss_fn(twin, part) / len(parts)).backward()
        twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with open_run(tmp_path / "run") as run:
        df = run.series(["gsnr_microbatch_mean", "gsnr_microbatch_median"])
    assert sorted(df.step.unique()) == [0, 1]
    for step, ref in enumerate(refs):
        rec = {(r.metric, r.key): r.value for r in df[df.step == step].itertuples()}
        check_summary(rec, "gsnr_microbatch", ref)


def test_microbatch_gsnr_with_fewer_than_4_reported_splits_the_batch() -> None:
    from diagnostics.gradients import gradient_moments

    model, batch = setup(n=12)
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    ctx.microbatch_moments = gradient_moments({"0.weight": torch.randn(3, 4, 3, dtype=torch.float64)})
    out = get_diagnostic("gsnr_microbatch", num_microbatches=4).compute(ctx)
    assert out.settings["source"] == "split" and out.settings["microbatch_size"] == 3
    ctx = StepContext(step=0, model=model, loss_fn=loss_fn, batch=batch, loss=None)
    ctx.microbatch_moments = gradient_moments({"0.weight": torch.randn(5, 4, 3, dtype=torch.float64)})
    out = get_diagnostic("gsnr_microbatch", num_microbatches=4).compute(ctx)
    assert out.settings == {"source": "accumulation", "microbatches": 5, "mode": "train"}
