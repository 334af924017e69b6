"""The signal detector's features against plain loops, its alarms, and the offline path."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from diagnostics.errors import ConfigError
from diagnostics.explosion.signal_detector import Feature, SignalDetectorCore, detect_signals


def ewm_reference(ys: list[float], t: int, half_life: int) -> tuple[float, float]:
    alpha = 1 - 0.5 ** (1 / half_life)
    mean, var = ys[0], 0.0
    for v in ys[1:t]:
        d = v - mean
        mean += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    return mean, var


def test_z_feature_against_a_loop() -> None:
    import random

    rng = random.Random(0)
    xs = [math.exp(rng.gauss(0, 1)) for _ in range(60)]
    f = Feature("loss", transform="log", method="z", window=10, min_obs=5)
    state: dict = {}
    got = [f.update(state, x) for x in xs]
    ys = [math.log(x) for x in xs]
    assert all(math.isnan(g) for g in got[:5])
    for t in range(5, 60):
        mean, var = ewm_reference(ys, t, 10)
        assert got[t] == pytest.approx((ys[t] - mean) / (math.sqrt(var) + 1e-3 * abs(mean) + 1e-8), rel=1e-12)
    assert f.update(state, math.inf) == math.inf and f.update(state, math.nan) == math.inf
    assert math.isnan(f.update(state, None)) and math.isnan(f.update(state, -1.0))  # no record; log undefined


def test_growth_direction_and_slog() -> None:
    f = Feature("attn_logit_max", transform="slog", method="growth", window=2, direction="down")
    state: dict = {}
    out = [f.update(state, v) for v in (1.0, 2.0, None, 5.0, -3.0)]
    assert math.isnan(out[0]) and math.isnan(out[1]) and math.isnan(out[2])
    assert out[3] == pytest.approx(-(math.log1p(5.0) - math.log1p(1.0)))
    assert out[4] == pytest.approx(-(-math.log1p(3.0) - math.log1p(2.0)))
    both = Feature("x", transform="raw", method="growth", window=1, direction="both")
    st: dict = {}
    assert [both.update(st, v) for v in (3.0, 1.0)][1] == 2.0


def test_core_alarms_with_persistence_and_rearms() -> None:
    core = SignalDetectorCore([Feature("x", transform="raw", method="growth", window=1)], threshold=0.5,
                              persistence=2)
    state: dict = {}
    series = [0, 1, 2, 3, 3, 3, 3, 4, 5]
    alarms = []
    for step, v in enumerate(series):
        _, a = core.update(state, step, {("x", "all"): float(v)})
        if a is not None:
            alarms.append(a.step)
    # above at steps 1, 2, 3 (alarm at 2), calm 4-6 (re-armed after 2), above 7, 8 (alarm at 8)
    assert alarms == [2, 8]


def test_logistic_combination_and_offline_path() -> None:
    feats = [Feature("loss", transform="raw", method="growth", window=1),
             Feature("grad_norm", transform="raw", method="growth", window=1)]
    core = SignalDetectorCore(feats, threshold=1.0, weights=[2.0, -1.0], bias=0.5, center=[0.0, 1.0],
                              scale=[1.0, 2.0])
    assert core.combine([1.0, 3.0]) == pytest.approx(0.5 + 2.0 * 1.0 - 1.0 * (3.0 - 1.0) / 2.0)
    assert core.combine([math.nan, 1e9]) == pytest.approx(0.5 - (50.0 - 1.0) / 2.0)  # NaN as 0, clipped
    rows = [(s, m, "all", 0, v) for s, (a, b) in enumerate([(1, 1), (1, 1), (3, 1), (3, 1)])
            for m, v in (("loss", a), ("grad_norm", b))]
    df = pd.DataFrame(rows, columns=["step", "metric", "key", "index", "value"])
    alarms = detect_signals(df, core)
    assert [a["step"] for a in alarms] == [2]
    assert set(alarms[0]["features"]) == {f.name for f in feats}


def test_bad_settings_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="transform"):
        Feature("loss", transform="sqrt")
    with pytest.raises(ConfigError, match="weights"):
        SignalDetectorCore([Feature("a"), Feature("b")], threshold=1.0)


def test_every_key_takes_the_largest_score_over_keys() -> None:
    f = Feature("sa_sigma1", key="*", transform="log", method="growth", window=1)
    core = SignalDetectorCore([f], threshold=0.5)
    state: dict = {}
    core.update(state, 0, {("sa_sigma1", "a"): 1.0, ("sa_sigma1", "b"): 1.0, ("loss", "all"): 3.0})
    score, alarm = core.update(state, 1, {("sa_sigma1", "a"): 1.1, ("sa_sigma1", "b"): 2.0})
    assert score == pytest.approx(math.log(2.0)) and alarm is not None
    assert core.signals == [("sa_sigma1", "*")]


def test_mean_over_keys_is_scored_as_one_series() -> None:
    f = Feature("sa_sign_diversity", key="*mean", transform="raw", direction="down", method="growth", window=1)
    core = SignalDetectorCore([f], threshold=0.1)
    state: dict = {}
    core.update(state, 0, {("sa_sign_diversity", "a"): 0.8, ("sa_sign_diversity", "b"): 0.6})
    score, _ = core.update(state, 1, {("sa_sign_diversity", "a"): 0.2, ("sa_sign_diversity", "b"): math.nan,
                                      ("sa_sign_diversity", "c"): 0.4})
    assert score == pytest.approx(-(0.3 - 0.7))
