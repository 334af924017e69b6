"""The overhead budget: the scheduler on fake clocks, then the Monitor with it on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError
from diagnostics.metrics import Diagnostic, get_diagnostic, resolve_diagnostics
from diagnostics.store import open_run
from diagnostics.store.records import Record, Status
from diagnostics.tracking import Monitor
from diagnostics.tracking.budget import (
    _COST_SMOOTHING,
    _THINNED_TOKEN,
    DEFAULT_BUDGET,
    MAX_STRIDE,
    STATE_KEY,
    BudgetScheduler,
    _average,
    budgeted,
    explicit_names,
    resolve_budget,
    scheduled_names,
)

# What one run of each scheduled diagnostic of the standard preset costs in the simulations (seconds).
COSTS = {
    "gsnr": 0.004, "hessian_top": 0.05, "sharpness": 0.02, "activation_rank": 0.001, "grad_rank": 0.001,
    "weight_rank": 0.0008, "spectral_alignment": 0.0003, "output_logits": 0.0005, "attention_stats": 0.0004,
    "adam_state": 0.0002,
}
SIGNALS = ("sharpness", "hessian_top", "gsnr", "weight_rank", "grad_rank", "activation_rank", "spectral_alignment")


class Clock:
    """A fake ``time.perf_counter`` the simulations move by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(
    diags: list[Diagnostic],
    costs: dict[str, float],
    *,
    steps: int,
    train: float = 0.010,
    fixed: float = 0.0002,
    budget: float = 0.05,
    explicit: set[str] | None = None,
    scheduler: BudgetScheduler | None = None,
    start: int = 0,
) -> tuple[BudgetScheduler, list[tuple[float, float, list[str]]]]:
    """Train ``steps`` fake steps: ``(scheduler, [(training s, monitor s, diagnostics run)] per step)``."""
    clock = Clock() if scheduler is None else scheduler._clock
    sched = scheduler or BudgetScheduler(budget, diags, explicit or set(), clock=clock)
    log = []
    for step in range(start, start + steps):
        clock.t += train
        with sched.call():
            due = sched.due(step, diags)
            spent = fixed + sum(costs.get(d.name, 0.0) for d in due)
            clock.t += spent
            sched.account({d.name: Status(d.name, "ok", None, costs.get(d.name, 0.0)) for d in due})
        log.append((train, spent, [d.name for d in due]))
    return sched, log


def runs_of(log: list[tuple[float, float, list[str]]], name: str) -> list[int]:
    return [i for i, (_, _, names) in enumerate(log) if name in names]


def worst_window(log: list[tuple[float, float, list[str]]], start: int, length: int) -> float:
    ratios = []
    for a in range(start, len(log) - length + 1):
        window = log[a : a + length]
        ratios.append(sum(m for _, m, _ in window) / sum(t for t, _, _ in window))
    return max(ratios)


# --- the rule, on fake timings ------------------------------------------------------------------------


def test_amortised_overhead_stays_within_the_budget_over_windows_of_200_steps() -> None:
    diags = resolve_diagnostics("standard")
    sched, log = simulate(diags, COSTS, steps=3000)
    # From step 300 the first and second runs (outside the budget) are behind every window.
    for length in (200, 201, 333, 1000):
        assert worst_window(log, 300, length) <= DEFAULT_BUDGET * (1 + 1e-9), length
    # and the budget is used, not left idle: the cheaper probes run far more often than their defaults
    assert worst_window(log, 300, 200) > 0.6 * DEFAULT_BUDGET
    assert len(runs_of(log, "weight_rank")) > 3000 / 50
    assert sched.intervals()["weight_rank"] < 50


def test_the_budget_counts_the_every_step_cost_first() -> None:
    diags = resolve_diagnostics("standard")
    _, light = simulate(diags, COSTS, steps=1200, fixed=0.0001)
    _, heavy = simulate(diags, COSTS, steps=1200, fixed=0.0004)
    assert len(runs_of(heavy, "weight_rank")) < len(runs_of(light, "weight_rank"))
    assert worst_window(heavy, 300, 200) <= DEFAULT_BUDGET * (1 + 1e-9)


def test_every_step_diagnostics_over_half_the_budget_are_thinned_and_the_budget_holds() -> None:
    diags = resolve_diagnostics("standard")
    # the every-step part alone: 1.8 ms of a 30 ms step, 6% against a 5% budget
    every_step = {"grad_norm": 0.0005, "weight_norm": 0.0005, "update_ratio": 0.0005, "loss": 0.0001}
    sched, log = simulate(diags, {**COSTS, **every_step}, steps=3000, train=0.030)
    assert set(every_step) <= sched.thinned and not sched.thinned & sched.scheduled
    # one call with them and s - 1 without fit in half the budget: s = ceil(1.6 / (0.75 - 0.2)) = 3
    assert sched.stride() == 3
    for length in (200, 333, 1000):
        assert worst_window(log, 300, length) <= DEFAULT_BUDGET * (1 + 1e-9), length
    loss = runs_of(log, "loss")
    assert runs_of(log, "grad_norm") == loss  # together, so one commit carries them
    late = [i for i in loss if i >= 300]
    assert loss[0] == 0 and {b - a for a, b in zip(late, late[1:])} == {3}
    # the other half of the budget is the probes': they keep running after their early runs
    assert len([i for i in runs_of(log, "weight_rank") if i > 300]) > 10
    # without thinning the every-step part alone would be over the budget (the previous behaviour)
    _, pinned = simulate(diags, {**COSTS, **every_step}, steps=600, train=0.030, explicit=set(every_step))
    assert runs_of(pinned, "loss") == list(range(600)) and worst_window(pinned, 300, 200) > DEFAULT_BUDGET


def test_the_stride_is_capped() -> None:
    diags = resolve_diagnostics("standard")
    # a 1 ms step: even the calls without the every-step diagnostics take more than half the budget
    sched, log = simulate(diags, {**COSTS, "loss": 0.0005}, steps=400, train=0.001)
    assert sched.stride() == MAX_STRIDE
    loss = runs_of(log, "loss")
    assert max(b - a for a, b in zip(loss, loss[1:])) == MAX_STRIDE


def test_first_runs_come_early_and_long_probes_one_per_step() -> None:
    diags = resolve_diagnostics("standard")
    sched, log = simulate(diags, COSTS, steps=20)
    first = {n: runs_of(log, n)[0] for n in sched.leaders}
    assert max(first.values()) < 5, first
    heavy_first = [first[n] for n in sched.heavy]
    assert {"gsnr", "hessian_top", "sharpness"} <= sched.heavy
    assert len(set(heavy_first)) == len(heavy_first), first  # no step runs two long probes first
    # and the cheap ones do not wait for the long ones
    assert all(first[n] == 0 for n in sched.leaders if n not in sched.heavy)


def test_expensive_probes_never_share_a_step_once_measured() -> None:
    diags = resolve_diagnostics("standard")
    sched, log = simulate(diags, COSTS, steps=2000)
    gaps = sched.intervals()
    expensive = {n for n, g in gaps.items() if g > 1}
    assert len(expensive) >= 5
    for step, (_, _, names) in enumerate(log):
        if step >= 10:
            assert len(expensive & set(names)) <= 1, (step, names)


def test_two_points_in_300_steps_when_the_every_step_cost_takes_all_the_budget() -> None:
    diags = resolve_diagnostics("standard")
    # the fixed part alone is 10% of training: nothing is left for the probes
    sched, log = simulate(diags, COSTS, steps=300, fixed=0.001)
    assert all(math.isinf(g) for g in sched.intervals().values())
    for name in SIGNALS:
        assert len(runs_of(log, name)) >= 2, name
    # after the second run the budget rules: no third run however long the run
    sched, log = simulate(diags, COSTS, steps=2000, fixed=0.001, scheduler=sched, start=300)
    assert all(len(runs_of(log, n)) == 0 for n in SIGNALS)


def test_explicit_every_wins_over_the_budget() -> None:
    diags = resolve_diagnostics("standard")
    every = {"gsnr": 7, "hessian_top": 400}
    for d in diags:
        if d.name in every:
            d.every = every[d.name]
    sched, log = simulate(diags, COSTS, steps=1000, explicit=explicit_names(diags, every))
    assert "gsnr" not in sched.scheduled and "hessian_top" not in sched.scheduled
    assert runs_of(log, "gsnr") == list(range(0, 1000, 7))
    assert runs_of(log, "hessian_top") == [0, 400, 800]
    assert explicit_names(diags, 3) == {d.name for d in diags}
    assert explicit_names(diags, None) == set()


def test_an_every_given_to_the_diagnostic_is_the_longest_gap() -> None:
    diags = [get_diagnostic("hessian_top", every=150), get_diagnostic("loss")]
    sched, log = simulate(diags, COSTS, steps=1000, fixed=0.001)  # no budget left: only the floor
    runs = runs_of(log, "hessian_top")
    # Its calls are cut to a share of the training step: the first waits for one step to be measured.
    assert runs[0] == 1 and len(runs) >= 1000 // 150
    assert max(b - a for a, b in zip(runs, runs[1:])) <= 150


def test_the_schedule_depends_only_on_the_measured_times() -> None:
    diags = resolve_diagnostics("standard")
    _, a = simulate(diags, COSTS, steps=800)
    _, b = simulate(resolve_diagnostics("standard"), COSTS, steps=800)
    assert [names for _, _, names in a] == [names for _, _, names in b]
    _, c = simulate(diags, {**COSTS, "gsnr": 0.002}, steps=800)
    assert len(runs_of(c, "gsnr")) > len(runs_of(a, "gsnr"))


class Leader(Diagnostic):
    name = "leader"
    metrics: ClassVar[tuple[str, ...]] = ()

    def compute(self, ctx: Any) -> list[Record]:
        return []


class Follower(Leader):
    name = "follower"
    after: ClassVar[tuple[str, ...]] = ("leader",)


def test_a_reader_of_a_scheduled_diagnostic_runs_with_it() -> None:
    diags = [Leader(), Follower()]
    sched, log = simulate(diags, {"leader": 0.02, "follower": 0.01}, steps=1500)
    assert sched.leaders == ["leader"] and sched.followers == {"follower": "leader"}
    assert runs_of(log, "follower") == runs_of(log, "leader") and len(runs_of(log, "leader")) > 3
    # the follower's cost counts towards the leader's gap
    assert worst_window(log, 300, 200) <= DEFAULT_BUDGET * (1 + 1e-9)


def test_rank_zero_decides_for_every_rank() -> None:
    diags = resolve_diagnostics("standard")
    rank0, log0 = simulate(diags, COSTS, steps=400)
    # rank 0's broadcast: its scheduled picks, and whether the every-step diagnostics run
    decisions = iter([[n for n in names if n in rank0.scheduled] + [_THINNED_TOKEN] * bool(rank0.thinned & set(names))
                      for _, _, names in log0])
    clock = Clock()
    # another rank measures other times but runs what rank 0 decided
    other = BudgetScheduler(DEFAULT_BUDGET, diags, clock=clock, sync=lambda _: next(decisions))
    _, log1 = simulate(diags, {k: 3 * v for k, v in COSTS.items()}, steps=400, scheduler=other)
    assert [n for _, _, n in log1] == [n for _, _, n in log0]
    assert other.runs == rank0.runs and other.last == rank0.last


def test_scheduler_state_round_trip_continues_the_schedule() -> None:
    diags = resolve_diagnostics("standard")
    sched, _ = simulate(diags, COSTS, steps=500)
    again = BudgetScheduler(DEFAULT_BUDGET, resolve_diagnostics("standard"), clock=Clock())
    again.load_state_dict(sched.state_dict())
    assert again.state_dict() == sched.state_dict()
    assert again.intervals() == sched.intervals()
    # resumed: no first runs again, and the next runs come when the saved schedule says
    _, log = simulate(diags, COSTS, steps=40, scheduler=again, start=500)
    assert runs_of(log, "hessian_top") == [] and runs_of(log, "sharpness") == []


def test_steps_counting_again_from_zero_start_the_schedule_again() -> None:
    diags = resolve_diagnostics("standard")
    sched, _ = simulate(diags, COSTS, steps=300)
    _, log = simulate(diags, COSTS, steps=10, scheduler=sched, start=0)
    first = {n: runs_of(log, n) for n in sched.leaders}
    assert all(first[n][:1] == [0] for n in sched.leaders if n not in sched.heavy), first
    assert sorted(first[n][0] for n in sched.heavy) == [0, 1, 2]


def test_resolve_budget() -> None:
    assert resolve_budget("auto", "standard") == DEFAULT_BUDGET == 0.05
    assert resolve_budget("auto", None) == DEFAULT_BUDGET
    assert resolve_budget("auto", "cheap") is None
    assert resolve_budget("auto", ["gsnr", "loss"]) is None
    assert resolve_budget(None, "standard") is None
    assert resolve_budget(0.1, "cheap") == 0.1
    for bad in (0, -0.1, 1.5, "lots", True):
        with pytest.raises(ConfigError, match="budget"):
            resolve_budget(bad, "standard")


# --- the Monitor with a budget ------------------------------------------------------------------------


def _train(monitor: Monitor | None, model: nn.Module, steps: int, start: int = 0, batch_size: int = 16) -> None:
    gen = torch.Generator().manual_seed(start)
    opt = monitor.optimizer if monitor is not None else torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(start, start + steps):
        x = torch.randn(batch_size, 64, generator=gen)
        y = torch.randint(0, 10, (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if monitor is not None:
            monitor.step(step, (x, y), loss)
        opt.step()


def _mlp() -> nn.Module:
    from diagnostics.zoo import get_model

    return get_model("mlp-digits", seed=0)


def test_standard_preset_on_a_tiny_model_stores_two_points_of_every_signal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, run=tmp_path / "run", diagnostics="standard", optimizer=opt,
                 probe_data=[(torch.randn(8, 64), torch.randint(0, 10, (8,)))]) as monitor:
        _train(monitor, model, 300)
    with open_run(tmp_path / "run") as run:
        status = run.status()
        meta = run.meta
        overhead = run.series("monitor_overhead")
        stride = run.series("monitor_stride")
    calls = status.groupby("diagnostic").size()
    for name in SIGNALS:
        assert calls.get(name, 0) >= 2, (name, calls.to_dict())
    # On this model's sub-millisecond steps the every-step diagnostics alone take more than half the budget:
    # they run together, every MAX_STRIDE steps at the least, and the stored stride says how often.
    loss_steps = sorted(status[status.diagnostic == "loss"].step)
    assert loss_steps == sorted(status[status.diagnostic == "grad_norm"].step)
    assert loss_steps[0] == 0 and max(b - a for a, b in zip(loss_steps, loss_steps[1:])) <= MAX_STRIDE
    assert len(loss_steps) >= 300 // MAX_STRIDE and stride.value.max() > 1
    assert meta["budget"] == DEFAULT_BUDGET
    assert len(overhead) >= len(loss_steps) and (overhead.value > 0).all()
    assert STATE_KEY in meta["diagnostic_state"]


def _probe_list() -> list[Any]:
    return ["weight_rank", "grad_rank", "spectral_alignment", "loss"]


def test_a_budget_on_a_list_runs_each_probe_at_least_twice_early(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, run=tmp_path / "run", diagnostics=_probe_list(), optimizer=opt, budget=0.05) as monitor:
        _train(monitor, model, 120)
        sched = monitor._budget
    assert sched is not None and sched.leaders == ["weight_rank", "grad_rank", "spectral_alignment"]
    with open_run(tmp_path / "run") as run:
        steps = {n: sorted(g.step) for n, g in run.status().groupby("diagnostic")}
        assert run.meta["budget"] == 0.05
    for name in sched.leaders:
        assert len(steps[name]) >= 2 and steps[name][0] <= 2 and steps[name][1] <= 2 + 100, (name, steps[name])
    # the loss's call costs more than half the budget of a sub-millisecond step: thinned, never beyond MAX_STRIDE
    loss = steps["loss"]
    assert loss[0] == 0 and max(b - a for a, b in zip(loss, loss[1:])) <= MAX_STRIDE and len(loss) < 120


def test_every_given_keeps_an_every_step_diagnostic_at_every_step(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, run=tmp_path / "run", diagnostics=_probe_list(), optimizer=opt, budget=0.05,
                 every={"loss": 1}) as monitor:
        _train(monitor, model, 60)
        assert "loss" not in monitor._budget.thinned
    with open_run(tmp_path / "run") as run:
        assert sorted(run.status().query("diagnostic == 'loss'").step) == list(range(60))


def test_without_a_budget_the_schedules_are_fixed(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, run=tmp_path / "run", diagnostics=["weight_rank", "loss"], optimizer=opt,
                 budget=None) as monitor:
        _train(monitor, model, 120)
        assert monitor._budget is None
    with open_run(tmp_path / "run") as run:
        assert sorted(run.status().query("diagnostic == 'weight_rank'").step) == [0, 50, 100]
        assert "monitor_overhead" not in run.metrics()
        assert run.meta["budget"] is None
    # the standard preset's default budget goes with budget=None too
    with Monitor(_mlp(), run=tmp_path / "std", diagnostics="standard", budget=None) as monitor:
        assert monitor._budget is None and monitor.budget is None


def test_a_budget_leaves_training_unchanged_and_no_hooks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, watched = _mlp(), _mlp()
    _train(None, plain, 60)
    opt = torch.optim.SGD(watched.parameters(), lr=0.05)
    rng_before = torch.random.get_rng_state()
    with Monitor(watched, run=tmp_path / "run", diagnostics=_probe_list(), optimizer=opt, budget=0.5) as monitor:
        _train(monitor, watched, 60)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), n
    for m in watched.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not opt._optimizer_step_post_hooks


def test_a_resumed_run_continues_the_schedule(tmp_path: Path) -> None:
    # A budget too small for any probe: after their two early runs the schedule runs them no more.
    tiny = 1e-6
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, run=tmp_path / "run", diagnostics=_probe_list(), optimizer=opt, budget=tiny) as monitor:
        _train(monitor, model, 150)
        saved = monitor.state_dict()[STATE_KEY]
    assert all(saved["runs"][n] == 2 for n in ("weight_rank", "grad_rank", "spectral_alignment")), saved
    with Monitor(model, run=tmp_path / "run", diagnostics=_probe_list(), optimizer=opt, budget=tiny) as resumed:
        assert resumed.resumed
        assert resumed._budget.state_dict() == saved
        _train(resumed, model, 3, start=150)
    with Monitor(model, run=tmp_path / "fresh", diagnostics=_probe_list(), optimizer=opt, budget=tiny) as fresh:
        _train(fresh, model, 3, start=150)
    with open_run(tmp_path / "run") as run, open_run(tmp_path / "fresh") as other:
        resumed_rows = run.status().query("step >= 150")
        fresh_rows = other.status()
    assert set(resumed_rows.diagnostic) == {"loss"}  # no probe ran again at once
    assert {"weight_rank", "grad_rank", "spectral_alignment"} <= set(fresh_rows.diagnostic)


def test_the_first_runs_one_time_cost_does_not_set_the_schedule() -> None:
    # A first run that costs 1000x the later ones (a cold start, an extra forward, first-call imports)
    # must not starve the diagnostic for the rest of the run: the second run's cost replaces it.
    diags = resolve_diagnostics("standard")
    clock = Clock()
    sched = BudgetScheduler(DEFAULT_BUDGET, diags, set(), clock=clock)
    seen: dict[str, int] = {}
    for step in range(1200):
        clock.t += 0.010
        with sched.call():
            due = sched.due(step, diags)
            costs = {}
            for d in due:
                seen[d.name] = seen.get(d.name, 0) + 1
                base = COSTS.get(d.name, 0.0)
                costs[d.name] = base * (1000 if seen[d.name] == 1 and d.name == "weight_rank" else 1)
            clock.t += 0.0002 + sum(costs.values())
            sched.account({n: Status(n, "ok", None, c) for n, c in costs.items()})
    assert sched.intervals()["weight_rank"] < 50
    assert seen["weight_rank"] > 1200 / 50


def test_what_the_budget_schedules() -> None:
    standard = resolve_diagnostics("standard")
    names = scheduled_names(standard, set())
    # Adam state only reads, but its passes over every parameter cost a share of a step: scheduled.
    assert "adam_state" in names and "hessian_top" in names and "gsnr" in names
    assert not {"loss", "grad_norm", "weight_norm", "update_ratio", "nonfinite", "explosion_detector"} & set(names)
    assert "adam_state" not in scheduled_names(standard, explicit_names(standard, {"adam_state": 10}))

    class Probe(Diagnostic):
        name = "test_probe"

        def compute(self, ctx: Any) -> list[Record]:
            return []

    class Cheap(Probe):
        name = "test_cheap_reader"
        reads_only = True

    class Reader(Cheap):
        name = "test_costly_reader"
        budgeted = True

    assert [budgeted(Reader()), budgeted(Cheap()), budgeted(Probe())] == [True, False, True]


def test_a_run_costlier_than_any_window_still_runs_and_the_others_hold_the_budget() -> None:
    # The every-step part leaves 200 steps x (5% of 10 ms - 0.2 ms) = 0.06 s per window; one GSNR run costs 0.08 s.
    diags = resolve_diagnostics(["weight_rank", "gsnr", "loss"])
    costs = {"weight_rank": 0.0008, "gsnr": 0.08}
    sched, log = simulate(diags, costs, steps=6000)
    late = [s for s in runs_of(log, "gsnr") if s >= 300]
    assert len(late) >= 3, late  # not starved by the cheaper probe, which always fits
    assert all(b - a >= sched.intervals()["gsnr"] for a, b in zip(late, late[1:]))
    assert len([s for s in runs_of(log, "weight_rank") if s >= 300]) > 5700 / 50
    # Windows without a GSNR run hold the budget; a window with one holds only that run beyond it.
    for a in range(300, len(log) - 200):
        window = log[a : a + 200]
        spent = sum(m for _, m, _ in window) - sum(costs["gsnr"] for *_, ns in window if "gsnr" in ns)
        assert spent <= DEFAULT_BUDGET * sum(t for t, _, _ in window) * (1 + 1e-9), a


def test_a_run_turned_away_keeps_its_turn() -> None:
    # hessian_top's runs cost most of a window: it must still come back at about its gap.
    diags = resolve_diagnostics("standard")
    costs = dict(COSTS, hessian_top=0.055)
    sched, log = simulate(diags, costs, steps=9000)
    late = [s for s in runs_of(log, "hessian_top") if s >= 300]
    gap = sched.intervals()["hessian_top"]
    assert len(late) >= 2 and all(b - a <= gap + 200 for a, b in zip(late, late[1:])), (late, gap)
    for length in (200, 333, 1000):
        assert worst_window(log, 300, length) <= DEFAULT_BUDGET * (1 + 1e-9), length


def test_a_budget_holds_hooks_open_only_for_diagnostics_cheap_to_observe() -> None:
    diags = resolve_diagnostics("standard")
    cheap = {n: 1e-6 for n in COSTS}  # every scheduled diagnostic fits at every step
    sched, _ = simulate(diags, cheap, steps=300)
    by_name = {d.name: d for d in diags}
    assert sched.intervals()["attention_stats"] == sched.intervals()["spectral_alignment"] == 1.0
    step = 299
    # spectral alignment's hooks only gather rows: it may read the user's next forward
    assert sched.due_next(by_name["spectral_alignment"], step)
    # attention statistics intercept every op of the forward, a cost the budget would take for training time
    assert not by_name["attention_stats"].cheap_to_observe
    assert not sched.due_next(by_name["attention_stats"], step)


def test_diagnostics_pinned_by_every_do_not_count_against_the_every_step_half() -> None:
    diags = resolve_diagnostics("standard")
    # spectral alignment pinned at every step costs 3 ms a step, more than the whole 1.5 ms budget; the thinned
    # part (0.4 ms with the 0.2 ms call) fits its half alone, so thinning it would save nothing the user chose
    costs = {**COSTS, "spectral_alignment": 0.003, "grad_norm": 0.0002, "weight_norm": 0.0002}
    sched, log = simulate(diags, costs, steps=400, train=0.030, explicit={"spectral_alignment"})
    assert "spectral_alignment" not in sched.thinned | sched.scheduled
    assert sched.stride() == 1 and runs_of(log, "loss") == list(range(400))


# --- a long probe's first run, a slice per step ------------------------------------------------------------


def test_a_resumable_first_run_is_carried_on_outside_the_budget_and_only_the_first() -> None:
    diags = [get_diagnostic("hessian_top"), get_diagnostic("loss")]
    sched, log = simulate(diags, COSTS, steps=3)
    assert runs_of(log, "hessian_top") == [1]  # waits for a measured step
    assert sched.probe_seconds() == pytest.approx(DEFAULT_BUDGET * sched.window * sched.step_seconds)
    clock = sched._clock
    cost = sched.cost.get("hessian_top")
    clock.t += 0.010
    with sched.call():
        due = sched.due(3, diags)
        assert [d.name for d in due] == ["loss"]
        assert sched.carry_on(["hessian_top"]) == ["hessian_top"]
        assert "hessian_top" in sched._exempt_now  # a first run's slice: outside the budget
        clock.t += 5.0
        sched.account({"hessian_top": Status("hessian_top", "ok", None, 5.0), "loss": Status("loss", "ok", None, 0)},
                      unfinished=["hessian_top"])
    assert sched.cost.get("hessian_top") == cost and sched.runs["hessian_top"] == 1  # the run goes on
    clock.t += 0.010
    with sched.call():
        sched.due(4, diags)
        assert sched.carry_on(["hessian_top"]) == ["hessian_top"]
        clock.t += 1.0
        sched.account({"hessian_top": Status("hessian_top", "ok", None, 1.0), "loss": Status("loss", "ok", None, 0)})
    # the run ended: one cost sample, the sum of the calls since it was cut (5 s + 1 s)
    assert sched.cost["hessian_top"] == pytest.approx(_average(cost, 6.0, _COST_SMOOTHING))
    sched._exempt_now = {"sharpness"}  # another long probe's first run at this call: the slice waits
    sched.heavy = sched.heavy | {"sharpness"}
    assert sched.carry_on(["hessian_top"]) == []
    sched._exempt_now, sched._admitted_now = set(), set()
    sched.runs["hessian_top"] = 3
    assert sched.carry_on(["hessian_top"]) == ["hessian_top"]
    assert "hessian_top" in sched._admitted_now  # a later run's slices count as the run the ledger let in
    ranked = BudgetScheduler(DEFAULT_BUDGET, diags, set(), sync=lambda names: names)
    ranked.step_seconds = 0.01
    assert ranked.probe_seconds() is None  # under torch.distributed every rank must stop at the same product


def _medium_mlp() -> tuple[nn.Module, Any]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    data = [(torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 4, (64,)))]
    return model, data


def test_the_monitor_spreads_a_first_probe_over_steps_and_it_measures_its_first_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diagnostics.loss import ClassificationLoss
    from tests.reference import dense_hessian

    # One product per call (any positive time allows one): the first run takes a step per product.
    monkeypatch.setattr(BudgetScheduler, "probe_seconds",
                        lambda self: None if self.step_seconds is None else 1e-12)
    plain, data = _medium_mlp()
    model, _ = _medium_mlp()
    loss_fn = ClassificationLoss()
    params_at: dict[int, dict[str, torch.Tensor]] = {}

    def train(m: nn.Module, monitor: Monitor | None, steps: int) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(steps):
            params_at[step] = {n: p.detach().clone() for n, p in m.named_parameters()}
            loss = loss_fn(m, data[0])
            opt.zero_grad()
            loss.backward()
            if monitor is not None:
                monitor.step(step, data[0], loss)
            opt.step()

    train(plain, None, 60)
    top = get_diagnostic("hessian_top", k=3, tol=1e-8)
    with Monitor(model, loss_fn, run=tmp_path / "run", diagnostics=[top], probe_data=data, budget=0.05) as monitor:
        train(model, monitor, 60)
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n  # training as without the monitor
    run = open_run(tmp_path / "run")
    st = run.status()
    st = st[st.diagnostic == "hessian_top"].sort_values("step")
    ended = st[st.status == "ok"].step.iloc[0]
    spread = st[st.step <= ended]
    assert list(spread.step) == list(range(1, ended + 1)) and ended > 5  # one slice at each step
    assert (spread.num_matvecs.iloc[:-1] == 1).all()
    assert all("continues at the next probe" in r for r in spread.reason.iloc[:-1])
    probe_step = run.series("hessian_probe_step")
    assert list(probe_step.step) == [ended] and list(probe_step.value) == [1.0]
    # The eigenvalues stored at the end are those of the Hessian at step 1's parameters.
    reference = _medium_mlp()[0]
    reference.load_state_dict(params_at[1])
    names = [n for n, _ in reference.named_parameters()]
    truth = torch.linalg.eigvalsh(dense_hessian(reference, loss_fn, data, names)).flip(0)[:3]
    got = run.series("hessian_eigenvalue")
    got = torch.tensor(got[got.step == ended].sort_values("index").value.to_numpy())
    assert torch.allclose(got, truth, rtol=1e-6)


def test_the_readers_of_a_carried_run_run_at_the_step_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diagnostics.loss import ClassificationLoss

    monkeypatch.setattr(BudgetScheduler, "probe_seconds",
                        lambda self: None if self.step_seconds is None else 1e-12)
    model, data = _medium_mlp()
    loss_fn = ClassificationLoss()
    diags = [get_diagnostic("hessian_top", k=2, tol=1e-8), get_diagnostic("grad_subspace")]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Monitor(model, loss_fn, run=tmp_path / "run", diagnostics=diags, probe_data=data, budget=0.05,
                 optimizer=opt) as monitor:
        for step in range(40):
            loss = loss_fn(model, data[0])
            opt.zero_grad()
            loss.backward()
            monitor.step(step, data[0], loss)
            opt.step()
    run = open_run(tmp_path / "run")
    st = run.status()
    top = st[st.diagnostic == "hessian_top"]
    ended = int(top[top.status == "ok"].step.min())
    assert ended > 2 and len(top[top.step < ended]) > 1  # the first run was carried over several steps
    fraction = run.series("grad_subspace_fraction")
    assert ended in set(fraction.step)  # the reader ran where the run ended and read its eigenspace


def test_every_run_after_the_first_was_announced_by_may_run_next() -> None:
    # GSNR reads the training step when the Monitor held its hooks open the step before: may_run_next
    # must have said so before every run but the first, and binds nothing (not every announced step runs).
    diags = resolve_diagnostics("standard")
    by_name = {d.name: d for d in diags}
    clock = Clock()
    sched = BudgetScheduler(DEFAULT_BUDGET, diags, set(), clock=clock)
    announced: set[int] = set()
    ran: list[int] = []
    for step in range(1500):
        clock.t += 0.010
        with sched.call():
            due = sched.due(step, diags)
            clock.t += 0.0002 + sum(COSTS.get(d.name, 0.0) for d in due)
            sched.account({d.name: Status(d.name, "ok", None, COSTS.get(d.name, 0.0)) for d in due})
        ran += [step] if any(d.name == "gsnr" for d in due) else []
        if sched.may_run_next(by_name["gsnr"], step):
            announced.add(step + 1)
    assert len(ran) >= 4
    assert ran[0] not in announced and all(s in announced for s in ran[1:]), (ran, sorted(announced))
    assert len(announced) <= 3 * len(ran)  # hooks held on few steps that do not run


def test_the_budget_counts_all_of_monitor_step_and_the_hooks_as_monitor_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing and reinstalling the observing hooks is the Monitor's work, not training time."""
    import diagnostics.tracking.monitor as monitor_module

    model, data = _medium_mlp()
    clock = Clock()
    install, remove = monitor_module.observe_training_forward, Monitor._stop_observing
    calls = {"install": 0, "remove": 0}

    def slow_install(*args: Any, **kwargs: Any) -> Any:
        clock.t += 1.0  # what reinstalling the hooks costs, on the budget's clock
        calls["install"] += 1
        return install(*args, **kwargs)

    def slow_remove(self: Monitor) -> None:
        clock.t += 0.5
        calls["remove"] += 1
        remove(self)

    monkeypatch.setattr(monitor_module, "observe_training_forward", slow_install)
    monkeypatch.setattr(Monitor, "_stop_observing", slow_remove)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, run=tmp_path / "run", diagnostics=["spectral_alignment"], budget=0.05) as monitor:
        monitor._budget._clock = clock
        for step in range(12):
            loss = nn.functional.cross_entropy(model(data[0][0]), data[0][1])
            opt.zero_grad()
            loss.backward()
            clock.t += 10.0  # the training step
            monitor.step(step, data[0], loss)
            opt.step()
        history = list(monitor._budget._history)
    assert calls["install"] == 12 and calls["remove"] >= 12 and len(history) >= 10
    for _, delta, train, spent in history[1:]:
        assert delta == 1
        assert train == pytest.approx(10.0, abs=1e-3)  # the hooks' 1.5 s are not training
        assert spent >= 1.5  # they are the monitor's
