"""The ``explosion_detector`` diagnostic in the Monitor: the same core as offline ``detect``."""

import pytest
import torch
from torch import nn

from diagnostics.errors import StopTraining
from diagnostics.metrics.explosion import ExplosionDetector, detect
from diagnostics.metrics.spectral_alignment import SpectralAlignment

PARAMS = dict(method="spectral_alignment", skip=5, warmup=20, smooth=3, persistence=4, min_layers=1, z=4.0, min_drop=0.15)


class _OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0]]))

    def forward(self, x):
        return self.lin(x)


def _batches(n, collapse_at, seed=0):
    # Symmetric inputs, then inputs shifted along v1 = e1: every token on one side of v1.
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n):
        x = torch.randn(32, 4, generator=g)
        if t >= collapse_at:
            x[:, 0] = x[:, 0].abs() + 1.0
        out.append((x,))
    return out


def _loss(model, batch):
    return model(batch[0]).pow(2).mean()


def _train(run, diagnostics, batches, actions=None):
    from diagnostics.tracking import Monitor

    model = _OneLinear()
    with Monitor(model, _loss, run=run, diagnostics=diagnostics, strict=True, actions=actions) as mon:
        for step, b in enumerate(batches):
            loss = _loss(model, b)
            model.zero_grad()
            loss.backward()
            mon.step(step, b, loss)  # no optimizer step: the weight (and v1) stay fixed


def test_online_events_equal_offline_detect(tmp_path):
    from diagnostics.store import open_run

    batches = _batches(70, 45)
    _train(tmp_path / "r", [SpectralAlignment(), ExplosionDetector(**PARAMS)], batches)
    run = open_run(tmp_path / "r")
    events = run.events()
    online = events[events.kind == "explosion_warning"]
    offline = detect(run.series(), **{k: v for k, v in PARAMS.items() if k != "method"})
    assert list(online["step"]) == [a["step"] for a in offline] and len(offline) == 1
    assert list(online["key"]) == ["lin"] and 45 <= offline[0]["step"] <= 52
    assert set(online["severity"]) == {"warning"}
    score = run.series("explosion_score")
    assert score["value"].between(0, 1).all() and score["value"].iloc[-1] == 1.0


def test_standalone_detector_after_spectral_alignment_and_stop_action(tmp_path):
    from diagnostics.store import open_run

    batches = _batches(70, 45)
    diags = [SpectralAlignment(), ExplosionDetector(action="stop", **PARAMS)]
    with pytest.raises(StopTraining) as info:
        _train(tmp_path / "s", diags, batches)
    assert info.value.event.kind == "explosion_warning"
    run = open_run(tmp_path / "s")
    stop_step = int(run.events().query("kind == 'explosion_warning'")["step"].iloc[0])
    assert run.steps()[-1] == stop_step  # the alarm's step is committed before training stops
    # Listed first, the Monitor still runs it after spectral_alignment (its ``after``).
    _train(tmp_path / "t", [ExplosionDetector(**PARAMS), SpectralAlignment()], batches)
    ev = open_run(tmp_path / "t").events()
    assert list(ev[ev.kind == "explosion_warning"]["step"]) == [stop_step]
    # Selected by name with options, the detector runs once: one score and one set of events per step.
    _train(tmp_path / "b", {"explosion_detector": PARAMS, "spectral_alignment": {}}, batches)
    run = open_run(tmp_path / "b")
    assert list(run.events().query("kind == 'explosion_warning'")["step"]) == [stop_step]
    assert run.series("explosion_score").groupby("step").size().max() == 1
    # Without spectral_alignment it records nothing and says why.
    _train(tmp_path / "n", [ExplosionDetector(**PARAMS)], batches[:3])
    st = open_run(tmp_path / "n").status()
    assert st[st.diagnostic == "explosion_detector"]["reason"].str.contains("not due").all()


def test_stop_through_monitor_actions_by_event_kind(tmp_path):
    with pytest.raises(StopTraining):
        _train(
            tmp_path / "u",
            [SpectralAlignment(), ExplosionDetector(**PARAMS)],
            _batches(70, 45),
            actions={"explosion_warning": "stop"},
        )


def test_signal_method_reads_this_steps_records_and_matches_offline(tmp_path):
    from diagnostics.explosion.signal_detector import SignalDetectorCore, detect_signals
    from diagnostics.store import open_run

    spec = {"features": [{"metric": "loss", "transform": "log", "method": "z", "window": 10, "min_obs": 5}],
            "threshold": 4.0}
    det = ExplosionDetector(method="signals", **spec)
    assert det.after == ("loss",)
    # the detector is listed first: its 'after' makes the Monitor run the loss diagnostic before it
    _train(tmp_path / "r", [det, "loss"], _batches(70, 45))
    run = open_run(tmp_path / "r")
    events = run.events()
    online = events[events.kind == "explosion_warning"]
    offline = detect_signals(run.series(), SignalDetectorCore(**spec))
    assert list(online["step"]) == [a["step"] for a in offline] == [45]
    assert "loss[all]:z10" in online["message"].iloc[0]
    assert len(run.series("explosion_score")) == 70 - 5


def test_signal_method_says_which_diagnostic_is_missing(tmp_path):
    from diagnostics.errors import ConfigError
    from diagnostics.store import open_run

    det = ExplosionDetector(method="signals", features=[{"metric": "grad_norm"}], threshold=3.0)
    _train(tmp_path / "r", [det], _batches(3, 99))
    status = open_run(tmp_path / "r").status()
    assert "add grad_norm to the diagnostics" in status[status.diagnostic == "explosion_detector"].reason.iloc[0]
    with pytest.raises(ConfigError, match="no diagnostic writes"):
        ExplosionDetector(method="signals", features=[{"metric": "made_up"}], threshold=1.0)
    with pytest.raises(ConfigError, match="method='spectral_alignment'"):
        ExplosionDetector(method="signals", skip=3)
