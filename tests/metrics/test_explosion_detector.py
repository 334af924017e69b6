import math
import random

import pandas as pd
import pytest
import torch
from torch import nn

from diagnostics.errors import ConfigError, StopTraining
from diagnostics.metrics.explosion import ExplosionDetector, ExplosionDetectorCore, detect
from diagnostics.metrics.spectral_alignment import SpectralAlignment

PARAMS = dict(skip=5, warmup=20, smooth=3, persistence=4, min_layers=1, z=4.0, min_drop=0.15)


def _series(layers: dict[str, list[float]], metric: str = "sa_sign_diversity") -> pd.DataFrame:
    rows = [
        {"step": t, "metric": metric, "key": k, "index": 0, "value": v}
        for k, vals in layers.items()
        for t, v in enumerate(vals)
    ]
    return pd.DataFrame(rows)


def _healthy(level: float, n: int, seed: int, noise: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [min(1.0, max(0.0, level + rng.gauss(0, noise))) for _ in range(n)]


def test_no_alarm_on_healthy_layers_including_one_sided_ones():
    layers = {
        "a": _healthy(0.9, 200, 0),
        "head": _healthy(0.03, 200, 1, 0.02),
        "b": _healthy(0.5, 200, 2, 0.1),
    }
    assert detect(_series(layers), **PARAMS) == []
    # An absolute threshold (diversity < 0.2) would fire on the one-sided head every step.
    assert min(layers["head"]) < 0.2


def test_collapse_relative_to_own_baseline_alarms_with_evidence():
    a = _healthy(0.9, 200, 3)
    a[120:] = _healthy(0.1, 80, 4, 0.03)
    layers = {"a": a, "head": _healthy(0.03, 200, 5, 0.02)}
    alarms = detect(_series(layers), **PARAMS)
    assert len(alarms) == 1
    al = alarms[0]
    assert al["layer"] == "a" and al["statistic"] == "sa_sign_diversity"
    # Smoothing (median of 3) needs 2 collapsed probes, then 4 in a row: alarm 3 + 3 steps after onset.
    assert 120 + PARAMS["persistence"] - 1 <= al["step"] <= 120 + PARAMS["persistence"] + 2
    assert al["baseline"] == pytest.approx(0.9, abs=0.05) and al["drop"] >= al["threshold"]


def test_short_dips_do_not_alarm():
    a = _healthy(0.9, 200, 6)
    for t in (60, 61, 100, 150, 151):
        a[t] = 0.0
    assert detect(_series({"a": a}), **PARAMS) == []


def test_rearms_after_recovery_and_needs_min_layers():
    a = _healthy(0.9, 300, 7)
    a[100:130] = [0.05] * 30
    a[200:230] = [0.05] * 30
    assert [x["step"] for x in detect(_series({"a": a}), **PARAMS)] == pytest.approx([104, 204], abs=2)
    assert detect(_series({"a": a, "b": _healthy(0.9, 300, 8)}), **{**PARAMS, "min_layers": 2}) == []


def test_other_statistics_and_bad_options():
    s = [0.1] * 60 + [0.6] * 30
    alarms = detect(_series({"x": s}, "sa_mean_abs"), statistic="sa_mean_abs", **PARAMS)
    assert alarms and alarms[0]["step"] >= 60
    sig = [1.0] * 60 + [4.0] * 30
    assert detect(_series({"x": sig}, "sa_sigma1"), statistic="sa_sigma1", **PARAMS)
    with pytest.raises(ConfigError, match="statistic"):
        ExplosionDetectorCore("loss")
    with pytest.raises(ConfigError):
        ExplosionDetectorCore(persistence=0)


def test_nonfinite_after_baseline_counts_as_deviating():
    a = _healthy(0.9, 100, 9) + [math.nan] * 10
    assert [x["step"] for x in detect(_series({"a": a}), **PARAMS)] == [103]


# --- online: the same core inside the Monitor ------------------------------------------------------
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
    _train(tmp_path / "r", [SpectralAlignment(detector=PARAMS)], batches)
    run = open_run(tmp_path / "r")
    events = run.events()
    online = events[events.kind == "explosion_warning"]
    offline = detect(run.series(), **PARAMS)
    assert list(online["step"]) == [a["step"] for a in offline] and len(offline) == 1
    assert list(online["key"]) == ["lin"] and 45 <= offline[0]["step"] <= 52
    assert set(online["severity"]) == {"warning"}
    score = run.series("explosion_score")
    assert score["value"].between(0, 1).all() and score["value"].iloc[-1] == 1.0


def test_standalone_detector_after_spectral_alignment_and_stop_action(tmp_path):
    from diagnostics.store import open_run

    batches = _batches(70, 45)
    diags = [SpectralAlignment(detector=False), ExplosionDetector(action="stop", **PARAMS)]
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
    # With the built-in detector on too, there is one score and one set of events per step.
    _train(tmp_path / "b", [SpectralAlignment(detector=PARAMS), ExplosionDetector(**PARAMS)], batches)
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
            [SpectralAlignment(detector=PARAMS)],
            _batches(70, 45),
            actions={"explosion_warning": "stop"},
        )


def test_burst_of_layers_alarms_without_persistence():
    a, b = _healthy(0.9, 100, 10), _healthy(0.8, 100, 11)
    a[80:] = [0.0] * 20
    b[80:] = [0.0] * 20
    params = {**PARAMS, "persistence": 10}
    assert (
        detect(_series({"a": a, "b": b}), **params)[0]["step"] == 90
    )  # 2 probes to move the median, then 10
    alarms = detect(_series({"a": a, "b": b}), **params, burst_layers=2)
    assert [x["step"] for x in alarms] == [80, 80]


def test_defaults_are_the_calibrated_setting():
    # benchmarks/RESULTS.md, "Loss-explosion early warning", frontier k = 1 (the setting behind 7/9 held-out, lead 46).
    settings = ExplosionDetectorCore().settings()
    assert {k: settings[k] for k in ("statistic", "min_drop", "z", "persistence", "min_layers")} == {
        "statistic": "sa_sign_diversity",
        "min_drop": 0.4,
        "z": 3.0,
        "persistence": 10,
        "min_layers": 2,
    }
    assert (settings["skip"], settings["warmup"], settings["smooth"], settings["rel_drop"]) == (
        40,
        60,
        3,
        0.5,
    )
    assert settings["burst_layers"] is None
