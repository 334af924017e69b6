"""The explosion detector's torch-free core and offline detection (diagnostics.explosion.detector)."""

import math
import random
import subprocess
import sys

import pandas as pd
import pytest

import diagnostics
from diagnostics.errors import ConfigError
from diagnostics.explosion import ExplosionDetectorCore, detect

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


def test_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; "
        "import diagnostics.explosion, diagnostics.explosion.detector, diagnostics.explosion.rule; "
        "assert 'pandas' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_implementation_behind_every_name():
    from diagnostics.metrics import explosion as online

    assert diagnostics.detect_explosions is detect
    assert online.detect is detect and online.ExplosionDetectorCore is ExplosionDetectorCore
