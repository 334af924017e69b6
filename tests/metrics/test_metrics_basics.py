"""Basic diagnostics against direct computations, including non-finite values."""

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


def setup() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,)))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.01}])
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    return model, opt, batch


def ctx_for(model: nn.Module, opt: Any, batch: Any, loss: float | None = 1.0) -> StepContext:
    return StepContext(step=3, model=model, loss_fn=None, batch=batch, loss=loss, optimizer=opt)


def as_dict(out: Any) -> dict[tuple[str, str, int], float]:
    records = out.records if isinstance(out, Output) else out
    return {(r.metric, r.key, r.index): r.value for r in expand_records(records)}


def test_grad_and_weight_norms() -> None:
    model, opt, batch = setup()
    ctx = ctx_for(model, opt, batch)
    g = as_dict(get_diagnostic("grad_norm").compute(ctx))
    w = as_dict(get_diagnostic("weight_norm").compute(ctx))
    for n, p in model.named_parameters():
        assert math.isclose(g[("grad_norm", n, 0)], float(p.grad.norm()), rel_tol=1e-12)
        assert math.isclose(w[("weight_norm", n, 0)], float(p.norm()), rel_tol=1e-12)
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert math.isclose(g[("grad_norm", "all", 0)], float(total), rel_tol=1e-12)


def test_learning_rate_per_group_and_loss() -> None:
    model, opt, batch = setup()
    ctx = ctx_for(model, opt, batch, loss=0.25)
    lr = as_dict(get_diagnostic("learning_rate").compute(ctx))
    assert lr == {("learning_rate", "all", 0): 0.1, ("learning_rate", "all", 1): 0.01}
    assert as_dict(get_diagnostic("loss").compute(ctx)) == {("loss", "all", 0): 0.25}
    assert get_diagnostic("loss").compute(ctx_for(model, opt, batch, loss=None)) == []


def test_update_ratio() -> None:
    model, opt, batch = setup()
    ctx = ctx_for(model, opt, batch)
    ctx._before_update = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ctx._after_update = True
    d = get_diagnostic("update_ratio")
    assert d.compute(ctx) == []
    got = as_dict(d.compute_after_update(ctx))
    for (n, before), p in zip(ctx._before_update.items(), model.parameters()):
        assert math.isclose(got[("update_ratio", n, 0)], float((p.detach() - before).norm() / before.norm()), rel_tol=1e-10)


def test_nonfinite_counts_and_event() -> None:
    model, opt, batch = setup()
    d = get_diagnostic("nonfinite")
    out = d.compute(ctx_for(model, opt, batch))
    assert as_dict(out) == {("nonfinite_grads", "all", 0): 0.0, ("nonfinite_loss", "all", 0): 0.0}
    assert out.events == []
    with torch.no_grad():
        model[0].weight.grad[0, :3] = float("nan")
        model[2].bias.grad[1] = float("inf")
    out = d.compute(ctx_for(model, opt, batch, loss=float("nan")))
    got = as_dict(out)
    assert got[("nonfinite_grads", "all", 0)] == 4.0
    assert got[("nonfinite_grads", "0.weight", 0)] == 3.0 and got[("nonfinite_grads", "2.bias", 0)] == 1.0
    assert got[("nonfinite_loss", "all", 0)] == 1.0
    (event,) = out.events
    assert event.kind == "nonfinite" and event.severity == "warning" and "loss = nan" in event.message
    # the norm diagnostic records the non-finite value instead of failing
    assert math.isnan(as_dict(get_diagnostic("grad_norm").compute(ctx_for(model, opt, batch)))[("grad_norm", "all", 0)])


def test_nan_loss_in_training_becomes_an_event_not_a_crash(tmp_path: Any) -> None:
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    model, opt, batch = setup()
    opt.zero_grad()
    with Monitor(model, run=tmp_path / "r", diagnostics="cheap", optimizer=opt) as mon:
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1]) * float("nan")
        loss.backward()
        mon.step(0, batch, loss)
        opt.step()
    run = open_run(tmp_path / "r")
    ev = run.events()
    assert list(ev.kind) == ["nonfinite"]
    assert run.series(metric="nonfinite_loss").value.iloc[0] == 1.0
    assert (run.status().status == "ok").all()


def test_per_layer_values_on_a_sparser_schedule_all_every_step(tmp_path: Any) -> None:
    from diagnostics.store import open_run
    from diagnostics.tracking import Monitor

    model, opt, batch = setup()
    diags = [get_diagnostic("grad_norm", per_layer_every=3), get_diagnostic("weight_norm"), "update_ratio", "loss"]
    with Monitor(model, run=tmp_path / "r", diagnostics=diags, optimizer=opt) as mon:
        for step in range(7):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
            loss.backward()
            mon.step(step, batch, loss)
            opt.step()
    s = open_run(tmp_path / "r").series()
    for metric, steps in (("grad_norm", [0, 3, 6]), ("weight_norm", [0]), ("update_ratio", [0])):
        rows = s[s.metric == metric]
        assert sorted(rows[rows.key == "all"].step) == list(range(7))
        assert sorted(rows[rows.key == "0.weight"].step) == steps
    with pytest.raises(ConfigError, match="per_layer_every"):
        get_diagnostic("grad_norm", per_layer_every=0)
    assert get_diagnostic("update_ratio", per_layer_every=1).settings()["per_layer_every"] == 1


def test_update_ratio_skips_parameters_that_are_zero_before_the_step(tmp_path):
    import torch
    from torch import nn

    from diagnostics import Monitor, open_run

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with Monitor(model, run=tmp_path / "run", diagnostics=["update_ratio"], optimizer=opt,
                 every={"update_ratio": 1}) as monitor:
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        monitor.step(0, batch, loss)
        opt.step()
    series = open_run(tmp_path / "run").series(metric="update_ratio")
    keys = set(series.key)
    assert "bias" not in keys and {"all", "weight"} <= keys
    assert series.value.map(lambda v: v == v and abs(v) != float("inf")).all()
