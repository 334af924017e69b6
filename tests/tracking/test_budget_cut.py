"""Probes cut into calls by the overhead budget, end to end in the Monitor: ``sharpness`` (its learning
rate, threshold and curvature all of the step it began), beside ``hessian_top``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from diagnostics.loss import ClassificationLoss
from diagnostics.metrics import get_diagnostic
from diagnostics.metrics.stability import sgd_threshold
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.tracking.budget import BudgetScheduler
from tests.reference import dense_hessian
from tests.tracking.test_budget import _medium_mlp


@pytest.fixture
def one_product_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget's time per call is tiny once a step was measured: each call of a cut probe runs one product."""
    monkeypatch.setattr(BudgetScheduler, "probe_seconds",
                        lambda self: None if self.step_seconds is None else 1e-12)


def _train(model: nn.Module, data: Any, monitor: Monitor | None, steps: int,
           params_at: dict[int, dict[str, torch.Tensor]]) -> None:
    loss_fn = ClassificationLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the lr moves every step
    if monitor is not None:
        monitor.optimizer = opt
    for step in range(steps):
        params_at[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = loss_fn(model, data[0])
        opt.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step(step, data[0], loss)
        opt.step()
        sched.step()


def test_the_monitor_spreads_sharpness_over_steps_with_the_threshold_of_its_first_step(
        tmp_path: Path, one_product_per_call: None) -> None:
    plain, data = _medium_mlp()
    model, _ = _medium_mlp()
    params_at: dict[int, dict[str, torch.Tensor]] = {}
    _train(plain, data, None, 50, {})
    sharp = get_diagnostic("sharpness", tol=1e-8, trace=False)
    with Monitor(model, ClassificationLoss(), run=tmp_path / "run", diagnostics=[sharp], probe_data=data,
                 budget=0.05) as monitor:
        _train(model, data, monitor, 50, params_at)
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n  # training as without the monitor
    run = open_run(tmp_path / "run")
    st = run.status()
    st = st[st.diagnostic == "sharpness"].sort_values("step")
    ended = int(st[st.status == "ok"].step.iloc[0])
    spread = st[st.step <= ended]
    assert list(spread.step) == list(range(1, ended + 1)) and ended > 3  # one slice at each step
    assert (spread.num_matvecs.iloc[:-1] == 1).all()
    assert all("the probe of step 1 continues" in r for r in spread.reason.iloc[:-1])
    assert list(run.series("sharpness_probe_step").value) == [1.0]
    reference = _medium_mlp()[0]
    reference.load_state_dict(params_at[1])
    names = [n for n, _ in reference.named_parameters()]
    lam = float(torch.linalg.eigvalsh(dense_hessian(reference, ClassificationLoss(), data, names))[-1])
    at_end = run.series().query("step == @ended")
    got = dict(zip(at_end.metric, at_end.value))
    assert got["sharpness"] == pytest.approx(lam, rel=1e-6)  # the Hessian of step 1, not of step `ended`
    lr1 = 0.1 / 2  # LambdaLR at step 1
    assert got["stability_threshold"] == pytest.approx(sgd_threshold(lr1, momentum=0.9))
    assert got["sharpness_ratio"] == pytest.approx(lam / sgd_threshold(lr1, momentum=0.9), rel=1e-6)


def test_two_cut_runs_continue_one_per_step_the_first_cut_first() -> None:
    from diagnostics.store.records import Status
    from tests.tracking.test_budget import COSTS, simulate

    diags = [get_diagnostic("hessian_top"), get_diagnostic("sharpness"), get_diagnostic("loss")]
    sched, _ = simulate(diags, COSTS, steps=3)
    sched.note_unfinished(["sharpness"])
    sched.note_unfinished(["sharpness", "hessian_top"])  # hessian_top cut after sharpness
    clock = sched._clock
    clock.t += 0.010
    with sched.call():
        sched.due(3, diags)
        assert sched.carry_on(["hessian_top", "sharpness"]) == ["sharpness"]  # the first cut, alone
        clock.t += 1.0
        sched.account({"sharpness": Status("sharpness", "ok", None, 1.0)}, unfinished=["hessian_top"])
    clock.t += 0.010
    with sched.call():
        sched.due(4, diags)
        assert sched.carry_on(["hessian_top"]) == ["hessian_top"]  # sharpness ended: the other goes on


def test_in_the_monitor_no_step_carries_two_slices(tmp_path: Path, one_product_per_call: None) -> None:
    model, data = _medium_mlp()
    diags = [get_diagnostic("hessian_top", k=3, tol=1e-8), get_diagnostic("sharpness", tol=1e-8, trace=False)]
    with Monitor(model, ClassificationLoss(), run=tmp_path / "run", diagnostics=diags, probe_data=data,
                 budget=0.05) as monitor:
        _train(model, data, monitor, 80, {})
    st = open_run(tmp_path / "run").status()
    st = st[st.diagnostic.isin(["hessian_top", "sharpness"])]
    assert (st.groupby("step").size() == 1).all()  # one long probe's slice per step
    ok = st[st.status == "ok"].groupby("diagnostic").step.min()
    assert set(ok.index) == {"hessian_top", "sharpness"}  # both first runs ended



def test_sharpness_beginning_with_a_cut_trace_run_is_cut_too(tmp_path: Path, one_product_per_call: None) -> None:
    """sharpness follows hessian_trace; when the trace's run is cut it cannot share its estimate, and sharpness
    was run whole at that step (the longest step of the ``full`` preset): its calls are cut as well."""
    model, data = _medium_mlp()
    diags = [get_diagnostic("hessian_trace", num_matvecs=12), get_diagnostic("sharpness", tol=1e-8, trace_matvecs=12)]
    with Monitor(model, ClassificationLoss(), run=tmp_path / "run", diagnostics=diags, probe_data=data,
                 budget=0.05) as monitor:
        _train(model, data, monitor, 60, {})
    st = open_run(tmp_path / "run").status()
    sharp = st[st.diagnostic == "sharpness"].sort_values("step")
    trace = st[st.diagnostic == "hessian_trace"].sort_values("step")
    began = int(trace.step.iloc[0])
    assert trace.status.iloc[0] == "continues"  # the trace's first run was cut ...
    assert int(sharp.step.iloc[0]) == began and sharp.status.iloc[0] == "continues"  # ... and sharpness's too
    assert int(sharp.num_matvecs.max()) == 1  # one product per call, never a whole Lanczos run
    ended = int(sharp[sharp.status == "ok"].step.iloc[0])
    trace_end = int(trace[trace.status == "ok"].step.iloc[0])
    assert trace_end < ended  # the trace's run, cut first, ended first
    # The sharpness probe took the trace of its own step from the trace's run, at the call that run ended.
    series = open_run(tmp_path / "run").series()
    at = series.query("step == @ended")
    got = dict(zip(at.metric, at.value))
    assert got["sharpness_probe_step"] == began
    tr = float(series.query("metric == 'hessian_trace' and step == @trace_end").value.iloc[0])
    lr = 0.1 / (1 + began)  # the LambdaLR of _train, at the step both probes describe
    assert got["trace_ratio"] == pytest.approx(tr * lr / 2, rel=1e-12)


def test_closing_the_monitor_frees_an_unfinished_probe(tmp_path: Path, one_product_per_call: None) -> None:
    model, data = _medium_mlp()
    diags = [get_diagnostic("hessian_top", k=3, tol=1e-8), get_diagnostic("sharpness", tol=1e-8, trace=False)]
    monitor = Monitor(model, ClassificationLoss(), run=tmp_path / "run", diagnostics=diags, probe_data=data,
                      budget=0.05)
    _train(model, data, monitor, 4, {})
    assert any(d.unfinished_run for d in monitor.diagnostics)  # closed in the middle of a cut probe
    monitor.close()
    assert not any(d.unfinished_run for d in monitor.diagnostics)
    st = open_run(tmp_path / "run").status()
    assert st[st.diagnostic.isin(["hessian_top", "sharpness"])].status.iloc[-1] == "continues"


def test_the_monitor_spreads_a_density_probe_over_steps(tmp_path: Path, one_product_per_call: None) -> None:
    from diagnostics.linalg import spectral_density

    plain, data = _medium_mlp()
    model, _ = _medium_mlp()
    params_at: dict[int, dict[str, torch.Tensor]] = {}
    _train(plain, data, None, 30, {})
    density = get_diagnostic("hessian_density", num_probes=2, steps=10, seed=1)
    with Monitor(model, ClassificationLoss(), run=tmp_path / "run", diagnostics=[density], probe_data=data,
                 budget=0.05) as monitor:
        _train(model, data, monitor, 30, params_at)
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n  # training as without the monitor
    run = open_run(tmp_path / "run")
    st = run.status().query("diagnostic == 'hessian_density'").sort_values("step")
    ended = int(st[st.status == "ok"].step.iloc[0])
    assert list(st.step[st.step <= ended]) == list(range(1, ended + 1)) and ended == 10  # a batched product a step
    assert list(run.series("hessian_density_probe_step").value) == [1.0]
    reference = _medium_mlp()[0]
    reference.load_state_dict(params_at[1])
    names = [n for n, _ in reference.named_parameters()]
    ref = spectral_density(dense_hessian(reference, ClassificationLoss(), data, names), num_probes=2, steps=10, seed=1)
    got = run.series("hessian_density_node").query("step == @ended").sort_values("index").value.to_numpy()
    assert torch.allclose(torch.tensor(got).reshape(2, 10), ref.nodes, rtol=1e-6, atol=1e-9)
