"""Misuse is never silent: each way of measuring nothing (or not what a number claims) warns once, stores a
``misuse`` event naming the fix, never leaves an ``ok`` status without rows, and raises when strict."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from diagnostics.reports.findings import run_findings
from diagnostics.reports.views import load_report_view
from torch import nn

from diagnostics import MisuseError, MisuseWarning, Monitor, open_run

STEPS = 4


class NoLinear(nn.Module):
    """A classifier with a weight matrix but no nn.Linear, attention or other module to measure."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n)]


def train(monitor: Monitor, model: nn.Module, opt: torch.optim.Optimizer, data: list[Any], *,
          step_before_backward: bool = False) -> None:
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if step_before_backward:
            monitor.step(step, (x, y), loss)
            loss.backward()
        else:
            loss.backward()
            monitor.step(step, (x, y), loss)
        opt.step()


def run_and_record(run_dir: Path, model: nn.Module, data: list[Any], **kwargs: Any) -> list[str]:
    """Train with a Monitor (SGD, lr 0.1); return the MisuseWarning messages."""
    step_before_backward = kwargs.pop("step_before_backward", False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Monitor(model, run=run_dir, optimizer=opt, **kwargs) as monitor:
            train(monitor, model, opt, data, step_before_backward=step_before_backward)
    return [str(w.message) for w in caught if issubclass(w.category, MisuseWarning)]


def misuse_events(run_dir: Path) -> Any:
    run = open_run(run_dir)
    try:
        events, status, series = run.events(), run.status(), run.series()
    finally:
        run.close()
    return events[events.kind == "misuse"], status, series


def findings_text(run_dir: Path) -> list[tuple[str, str]]:
    view = load_report_view(str(run_dir))
    return [(f.kind, f.text) for f in run_findings(view.runs[0])]


def test_step_before_backward_skips_gradient_diagnostics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = run_and_record(run_dir, mlp(), batches(), diagnostics=["loss", "grad_norm", "weight_norm", "nonfinite"],
                              step_before_backward=True)
    assert len(messages) == 1, messages  # once, not at each of the STEPS steps
    assert "backward()" in messages[0] and "zero_grad" in messages[0] and "grad_norm" in messages[0]
    events, status, series = misuse_events(run_dir)
    assert list(events.step) == [0] and events.iloc[0].data["cause"] == "no_grads"
    assert set(events.iloc[0].data["diagnostics"]) == {"grad_norm", "nonfinite"}
    for name in ("grad_norm", "nonfinite"):
        st = status[status.diagnostic == name]
        assert len(st) == STEPS and set(st.status) == {"skipped"}, st
        assert st.reason.str.contains("backward").all()
    assert not series.metric.isin(["grad_norm", "nonfinite_grads"]).any()
    # Diagnostics that need no gradient still ran.
    assert set(status[status.diagnostic.isin(["loss", "weight_norm"])].status) == {"ok"}
    kinds = findings_text(run_dir)
    assert any(k == "misuse" and "backward()" in t for k, t in kinds), kinds
    assert not any(k == "none" for k, _ in kinds)


def test_step_after_backward_is_not_misuse(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = run_and_record(run_dir, mlp(), batches(), diagnostics=["grad_norm", "nonfinite"])
    events, status, _ = misuse_events(run_dir)
    assert messages == [] and events.empty and set(status.status) == {"ok"}


def test_step_before_backward_raises_when_strict(tmp_path: Path) -> None:
    model, data = mlp(), batches(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MisuseError, match="after loss.backward"):
        with Monitor(model, run=tmp_path / "run", diagnostics=["grad_norm"], optimizer=opt, strict=True) as monitor:
            train(monitor, model, opt, data, step_before_backward=True)


NOTHING = ["spectral_alignment", "activation_rank", "attention_stats", "adam_state"]  # adam_state: under SGD


def test_nothing_to_measure_is_reported_once_per_diagnostic(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = run_and_record(run_dir, NoLinear(), batches(), diagnostics=NOTHING + ["explosion_detector"], every=1)
    assert len(messages) == len(NOTHING), messages  # the detector's cause is spectral_alignment's
    for name in NOTHING:
        assert sum(m.startswith(f"{name} found nothing to measure") for m in messages) == 1
    assert any("modules=" in m for m in messages if m.startswith("activation_rank"))
    events, status, _ = misuse_events(run_dir)
    assert sorted(events.key) == sorted(NOTHING)
    assert {e["cause"] for e in events.data} == {"nothing_measured"}
    for name in NOTHING:
        st = status[status.diagnostic == name]
        assert len(st) == STEPS and set(st.status) == {"nothing_measured"}, st
    assert set(status[status.diagnostic == "explosion_detector"].status) == {"skipped"}
    kinds = findings_text(run_dir)
    assert sum(k == "misuse" for k, _ in kinds) == len(NOTHING), kinds


@pytest.mark.parametrize("name", NOTHING)
def test_nothing_to_measure_raises_when_strict(name: str, tmp_path: Path) -> None:
    model, data = NoLinear(), batches(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MisuseError, match=f"{name} found nothing to measure"):
        with Monitor(model, run=tmp_path / "run", diagnostics=[name], optimizer=opt, strict=True) as monitor:
            train(monitor, model, opt, data)


def test_schedule_longer_than_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = run_and_record(run_dir, mlp(), batches(10), diagnostics=["loss", "weight_rank", "grad_rank"],
                              every={"weight_rank": 50, "grad_rank": 2})
    assert len(messages) == 1, messages
    assert "weight_rank ran once in 10 monitored steps" in messages[0]
    assert "every=50" in messages[0] and "every={'weight_rank': n}" in messages[0]
    events, _, _ = misuse_events(run_dir)
    assert len(events) == 1
    e = events.iloc[0]
    assert e.key == "weight_rank" and e.step == 9
    assert e.data["cause"] == "schedule" and e.data["runs"] == 1 and e.data["every"] == 50
    assert any(k == "misuse" and "weight_rank" in t for k, t in findings_text(run_dir))


def test_schedule_check_skips_interrupted_and_single_step_runs(tmp_path: Path) -> None:
    model, data = mlp(), batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            with Monitor(model, run=tmp_path / "a", diagnostics=["weight_rank"], optimizer=opt) as mon:
                train(mon, model, opt, data)
                raise KeyboardInterrupt
        with Monitor(model, run=tmp_path / "b", diagnostics=["weight_rank"], optimizer=opt) as mon:
            train(mon, model, opt, data[:1])
    assert not [w for w in caught if issubclass(w.category, MisuseWarning)]


def test_schedule_longer_than_the_run_raises_at_close_when_strict(tmp_path: Path) -> None:
    model, data = mlp(), batches(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, run=tmp_path / "run", diagnostics=["loss", "weight_rank"], optimizer=opt, strict=True)
    train(monitor, model, opt, data)
    with pytest.raises(MisuseError, match="weight_rank ran once"):
        monitor.close()
    events, _, series = misuse_events(tmp_path / "run")  # the store was closed with the event written
    assert list(events.key) == ["weight_rank"] and (series.metric == "loss").sum() == 3


def _sharpness_run(run_dir: Path, model: nn.Module, **kwargs: Any) -> list[str]:
    return run_and_record(run_dir, model, batches(), diagnostics=["sharpness"], every=1,
                          num_classes=3, **kwargs)


def test_sharpness_on_eval_mode_curvature_of_a_dropout_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = _sharpness_run(run_dir, mlp(dropout=0.2))
    assert len(messages) == 1, messages
    assert "2 (Dropout)" in messages[0] and "curvature_mode='train'" in messages[0]
    events, status, series = misuse_events(run_dir)
    assert len(events) == 1 and events.iloc[0].data["cause"] == "probe_mode" and events.iloc[0].key == "sharpness"
    st = status[status.diagnostic == "sharpness"]
    assert len(st) == STEPS and st.reason.str.contains("misuse: probe_mode").all()
    assert (series.metric == "sharpness_ratio").sum() == STEPS  # the numbers are kept, flagged by the reason
    assert any(k == "misuse" and "curvature_mode" in t for k, t in findings_text(run_dir))


@pytest.mark.parametrize("case", ["no dropout", "train-mode curvature"])
def test_sharpness_without_mode_mismatch_is_not_misuse(case: str, tmp_path: Path) -> None:
    if case == "no dropout":
        messages = _sharpness_run(tmp_path / "run", mlp())
    else:
        messages = _sharpness_run(tmp_path / "run", mlp(dropout=0.2), curvature_mode="train")
    events, status, _ = misuse_events(tmp_path / "run")
    assert messages == [] and events.empty
    assert not status[status.diagnostic == "sharpness"].reason.fillna("").str.contains("misuse").any()


def test_sharpness_mode_mismatch_raises_when_strict(tmp_path: Path) -> None:
    model, data = mlp(dropout=0.2), batches(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MisuseError, match="curvature_mode='train'"):
        with Monitor(model, run=tmp_path / "run", diagnostics=["sharpness"], optimizer=opt, strict=True) as monitor:
            train(monitor, model, opt, data)


def test_training_in_eval_mode_with_dropout_is_reported_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    model = mlp(dropout=0.2).eval()  # as a forgotten model.train() leaves it
    messages = run_and_record(run_dir, model, batches(), diagnostics=["loss", "grad_norm"])
    assert len(messages) == 1, messages
    assert "eval mode" in messages[0] and "2 (Dropout)" in messages[0] and "model.train()" in messages[0]
    events, status, _ = misuse_events(run_dir)
    assert list(events.step) == [0] and events.iloc[0].data["cause"] == "eval_mode"
    assert events.iloc[0].data["layers"] == ["2 (Dropout)"] and events.iloc[0].data["diagnostics"] == []
    assert set(status.status) == {"ok"}  # the diagnostics themselves measured what the step holds
    assert any(k == "misuse" and "model.train()" in t for k, t in findings_text(run_dir))


def test_training_in_eval_mode_is_reported_for_a_diagnostic_that_reads_the_training_forward(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    messages = run_and_record(run_dir, mlp().eval(), batches(), diagnostics=["loss", "spectral_alignment"])
    assert len(messages) == 1 and "spectral_alignment cannot read the training forward" in messages[0], messages
    events, _, _ = misuse_events(run_dir)
    assert events.iloc[0].data["layers"] == [] and events.iloc[0].data["diagnostics"] == ["spectral_alignment"]


@pytest.mark.parametrize("case", ["train mode", "no layer that depends on the mode", "observation off"])
def test_eval_mode_that_changes_nothing_is_not_misuse(case: str, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"diagnostics": ["loss", "grad_norm"]}
    if case == "train mode":
        model = mlp(dropout=0.2)
    elif case == "no layer that depends on the mode":
        model = mlp().eval()
    else:
        model = mlp(dropout=0.2).eval()
        kwargs["observe_training_forward"] = False
    messages = run_and_record(tmp_path / "run", model, batches(), **kwargs)
    events, _, _ = misuse_events(tmp_path / "run")
    assert messages == [] and events.empty


def test_training_in_eval_mode_raises_when_strict(tmp_path: Path) -> None:
    model, data = mlp(dropout=0.2).eval(), batches(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(MisuseError, match="model.train"):
        with Monitor(model, run=tmp_path / "run", diagnostics=["loss"], optimizer=opt, strict=True) as monitor:
            train(monitor, model, opt, data)
