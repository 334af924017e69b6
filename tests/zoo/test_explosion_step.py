"""The explosion suite's ground truth: the shared explosion rule (its definition is tested in
tests/test_explosion_rule.py) and the suite's own peak ratio."""

import math

import pytest

from benchmarks.explosions.explosion import explosion_step

NAN, INF = math.nan, math.inf


def test_suite_uses_the_shared_rule():
    from diagnostics.explosion import explosion_step as rule

    assert explosion_step is rule
    # The suite's labels: a sustained doubling of the best loss, dated to its start; NaN at once.
    assert explosion_step([3.0] * 25 + [1.0] * 10 + [2.5] * 15) == 35
    assert explosion_step([4.0, NAN]) == 1
    # evaluate.py passes the recorded steps of the store's loss series.
    assert explosion_step([2.0] * 30 + [4.5] * 10, steps=list(range(100, 140))) == 130


def test_peak_ratio():
    from benchmarks.explosions.run_suite import peak_ratio

    assert peak_ratio([4.0] * 20 + [2.0, 3.0, 5.0]) == pytest.approx(2.5)
    assert peak_ratio([4.0] * 25) == pytest.approx(1.0)
    assert peak_ratio([4.0, NAN]) == math.inf
