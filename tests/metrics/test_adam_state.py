"""adam_state against the update torch's Adam and AdamW actually make, and brute-force statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diagnostics.metrics.adam_state import QUANTILES, AdamState, adam_statistics
from diagnostics.metrics.context import StepContext

LR = 1e-2
CASES = [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1}),  # coupled L2: part of the gradient Adam uses
    (torch.optim.AdamW, {"weight_decay": 0.1}),  # decoupled: not part of u
    (torch.optim.Adam, {"amsgrad": True, "betas": (0.8, 0.9)}),
    (torch.optim.Adam, {"maximize": True}),
]


def setup(cls, kw, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    return model, cls(model.parameters(), lr=LR, eps=1e-8, **kw)


def backward(model, gen):
    x = torch.randn(7, 5, generator=gen, dtype=next(model.parameters()).dtype)
    model.zero_grad()
    (model(x) ** 2).sum().backward()


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunks-of-3"])
@pytest.mark.parametrize("cls,kw", CASES)
def test_update_matches_the_optimizer_step(cls, kw, chunk, monkeypatch) -> None:
    """Whole parameters, and (the CPU chunk lowered to 3 elements) a few elements at a time."""
    if chunk is not None:
        import diagnostics.metrics.adam_state as adam_state

        monkeypatch.setattr(adam_state, "_CPU_CHUNK", chunk)
    model, opt = setup(cls, kw)
    names = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        backward(model, gen)
        state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        stats = adam_statistics(opt, names, small_ratio=0.3)
        for p, s in opt.state.items():  # nothing written to the optimizer
            assert all(torch.equal(v, state_before[id(p)][k]) for k, v in s.items())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            decay = 1 - LR * kw.get("weight_decay", 0.0) if cls is torch.optim.AdamW else 1.0
            u = -(p.detach() - before[n] * decay) / LR  # the normalised update the step made
            g = p.grad.double() * (-1 if kw.get("maximize") else 1)
            if cls is torch.optim.Adam and kw.get("weight_decay"):
                g = g + kw["weight_decay"] * before[n]
            st = opt.state[p]
            t = float(st["step"])
            v = st["max_exp_avg_sq"] if kw.get("amsgrad") else st["exp_avg_sq"]
            vhat = v / (1 - opt.param_groups[0]["betas"][1] ** t)
            ps = stats[n]
            assert ps.rms() == pytest.approx(float(u.pow(2).mean().sqrt()), rel=1e-9)
            assert ps.cosine() == pytest.approx(float((u * g).sum() / (u.norm() * g.norm())), rel=1e-9)
            assert ps.small_fraction() == pytest.approx(float((g * g < 0.3 * vhat).double().mean()))
            assert ps.v_max == pytest.approx(float(vhat.sqrt().max()), rel=1e-12)


def test_diagnostic_records_and_quantiles() -> None:
    model, opt = setup(torch.optim.AdamW, {"weight_decay": 0.01}, torch.float32)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        backward(model, gen)
        opt.step()
    backward(model, gen)
    ctx = StepContext(step=2, model=model, loss_fn=None, batch=None, loss=None, optimizer=opt)
    out = AdamState(max_quantile_coords=10).compute(ctx)
    assert out.status == "ok"
    rec = {(r.metric, r.key, r.index): r.value for r in out.records}
    names = [n for n, _ in model.named_parameters()]
    for metric in ("adam_update_rms", "adam_update_grad_cosine", "adam_small_grad_fraction"):
        assert {k for m, k, _ in rec if m == metric} == set(names) | {"all"}
    # sqrt(v-hat) after this step, over every coordinate, in the optimizer's own arithmetic
    opt.step()
    b2 = opt.param_groups[0]["betas"][1]
    roots = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - b2 ** float(opt.state[p]["step"]))).sqrt().reshape(-1)
                       for p in model.parameters()]).double()
    q = [rec[("adam_sqrt_v_quantile", "all", i)] for i in range(len(QUANTILES))]
    assert q[0] == pytest.approx(float(roots.min()), rel=1e-5)
    assert q[-1] == pytest.approx(float(roots.max()), rel=1e-5)
    assert q == sorted(q)
    stride = math.ceil(roots.numel() / 10)
    sample = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - b2 ** 3)).sqrt().reshape(-1)[::stride]
                        for p in model.parameters()]).double()
    inner = torch.quantile(sample, torch.tensor(QUANTILES[1:-1], dtype=torch.float64))
    assert q[1:-1] == pytest.approx(inner.tolist(), rel=1e-5)


def test_first_step_update_is_the_sign_of_the_gradient() -> None:
    model, opt = setup(torch.optim.Adam, {})
    opt.param_groups[0]["eps"] = 0.0
    backward(model, torch.Generator().manual_seed(3))
    stats = adam_statistics(opt, {id(p): n for n, p in model.named_parameters()})
    for n, p in model.named_parameters():
        g = p.grad
        nz = float((g != 0).double().mean())
        assert stats[n].rms() == pytest.approx(math.sqrt(nz), rel=1e-12)
        assert stats[n].small_fraction() == 0.0 or (g == 0).any()


def test_other_optimizers_have_nothing_to_measure_and_the_reason_names_the_fix(tmp_path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = StepContext(step=0, model=model, loss_fn=None, batch=None, loss=None, optimizer=opt)
    out = AdamState().compute(ctx)
    assert out.status == "nothing_measured" and not out.records
    assert "SGD" in out.reason and "drop adam_state" in out.reason
    ctx = StepContext(step=0, model=model, loss_fn=None, batch=None, loss=None, optimizer=None)
    out = AdamState().compute(ctx)
    assert out.status == "nothing_measured" and "no optimizer" in out.reason and "optimizer=" in out.reason

    class Wrapper:  # an optimizer wrapper (accelerate-style) is unwrapped one level down
        def __init__(self, inner) -> None:
            self.optimizer = inner

    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    ctx = StepContext(step=0, model=model, loss_fn=None, batch=None, loss=None, optimizer=Wrapper(adam))
    assert AdamState().compute(ctx).status == "ok"


def test_the_quantiles_sample_is_every_strideth_element_whatever_the_chunks(monkeypatch) -> None:
    import diagnostics.metrics.adam_state as adam_state

    model, opt = setup(torch.optim.Adam, {})
    names = {id(p): n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        backward(model, gen)
        opt.step()
    backward(model, gen)
    whole = adam_statistics(opt, names, stride=3)
    monkeypatch.setattr(adam_state, "_CPU_CHUNK", 4)
    chunked = adam_statistics(opt, names, stride=3)
    for n in whole:
        assert torch.equal(torch.cat(whole[n].sample), torch.cat(chunked[n].sample)), n
        assert chunked[n].count == whole[n].count and chunked[n].small == whole[n].small
        assert chunked[n].v_min == whole[n].v_min and chunked[n].v_max == whole[n].v_max
