import math

import pytest

from benchmarks.explosions.explosion import explosion_step

NAN, INF = math.nan, math.inf


def _curve(n=60, value=2.0):
    # Decreasing start (like early training), then flat.
    return [5.0 - 3.0 * min(1.0, i / 10) for i in range(20)] + [value] * (n - 20)


def test_stable_curve_has_no_explosion():
    assert explosion_step(_curve()) is None
    assert explosion_step([]) is None


def test_sustained_high_loss_starts_at_first_high_step():
    losses = _curve(80)
    for i in range(40, 80):
        losses[i] = 4.5  # > 2 * 2.0
    assert explosion_step(losses) == 40


def test_short_spike_is_not_an_explosion():
    losses = _curve(80)
    for i in range(40, 49):  # 9 steps < patience 10
        losses[i] = 10.0
    assert explosion_step(losses) is None
    losses[49] = 10.0  # now 10 consecutive
    assert explosion_step(losses) == 40


def test_streak_broken_then_restarted():
    losses = _curve(100)
    for i in list(range(30, 35)) + list(range(50, 60)):
        losses[i] = 9.0
    assert explosion_step(losses) == 50


def test_exactly_twice_is_not_high():
    losses = _curve(60)
    for i in range(30, 60):
        losses[i] = 4.0  # == 2 * running min, not above
    assert explosion_step(losses) is None


def test_nonfinite_is_immediate_and_counts_the_streak():
    losses = _curve(60)
    losses[45] = NAN
    assert explosion_step(losses) == 45
    losses = _curve(60)
    losses[42:45] = [7.0, 9.0, 20.0]
    losses[45] = INF
    assert explosion_step(losses) == 42  # the streak ending in inf started at 42
    assert explosion_step([4.0, NAN]) == 1  # non-finite counts even before min_step


def test_min_step_and_running_min():
    # High relative to the running min, but before step 20: ignored.
    losses = [1.0] + [3.0] * 15 + [1.5] * 30
    assert explosion_step(losses) is None
    # The running min keeps falling: 2x of the lowest value so far is the threshold.
    losses = [3.0] * 25 + [1.0] * 10 + [2.5] * 15
    assert explosion_step(losses) == 35


def test_steps_and_options():
    losses = _curve(60)
    for i in range(30, 60):
        losses[i] = 3.5
    assert explosion_step(losses) is None
    assert explosion_step(losses, factor=1.5) == 30
    assert explosion_step(losses, factor=1.5, steps=list(range(100, 160))) == 130
    assert explosion_step(losses, factor=1.5, patience=40) is None
    with pytest.raises(ValueError):
        explosion_step(losses, factor=1.0)
    with pytest.raises(ValueError):
        explosion_step(losses, steps=[1, 2])


def test_peak_ratio():
    from benchmarks.explosions.run_suite import peak_ratio

    assert peak_ratio([4.0] * 20 + [2.0, 3.0, 5.0]) == pytest.approx(2.5)
    assert peak_ratio([4.0] * 25) == pytest.approx(1.0)
    assert peak_ratio([4.0, NAN]) == math.inf
