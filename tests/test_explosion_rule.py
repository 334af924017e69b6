"""The explosion rule (diagnostics.explosion): the one definition of "the loss exploded at step s"."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.errors import ConfigError
from diagnostics.explosion import explosion_step

NAN, INF = math.nan, math.inf


def _curve(n=60, value=2.0):
    # Decreasing start (like early training), then flat.
    return [5.0 - 3.0 * min(1.0, i / 10) for i in range(20)] + [value] * (n - 20)


def _reference(losses, steps=None, factor=2.0, patience=10, warmup=20):
    """The module docstring's definition, transcribed literally (quadratic; for comparison only)."""
    steps = list(range(len(losses))) if steps is None else list(steps)

    def high(i):
        finite_so_far = [x for x in losses[: i + 1] if math.isfinite(x)]
        m = min(finite_so_far) if finite_so_far else math.inf
        x = losses[i]
        return not math.isfinite(x) or (steps[i] >= warmup and m > 0 and x > factor * m)

    flags = [high(i) for i in range(len(losses))]
    for j in range(len(losses)):
        if not flags[j] or (j > 0 and flags[j - 1]):
            continue  # not the first entry of a streak
        end = j
        while end < len(losses) and flags[end]:
            end += 1
        streak = losses[j:end]
        if len(streak) >= patience or any(not math.isfinite(x) for x in streak):
            return steps[j]
    return None


# --- the definition (these cases were the explosion suite's tests) -------------------------------------


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
    assert explosion_step([4.0, NAN]) == 1  # non-finite counts even before the warm-up ends
    assert explosion_step([NAN]) == 0 and explosion_step([-INF, 1.0]) == 0


def test_warmup_and_running_min():
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
    assert explosion_step(losses, list(range(100, 160)), factor=1.5) == 130  # steps positional too
    assert explosion_step(losses, factor=1.5, patience=40) is None
    assert explosion_step(losses, factor=1.5, patience=30) == 30


# --- the demo's cases ----------------------------------------------------------------------------------


def test_demo_cases():
    assert explosion_step([3.0] * 30) is None
    assert explosion_step([3.0] * 25 + [7.0] * 10) == 25
    assert explosion_step([3.0] * 25 + [7.0] * 9 + [3.0]) is None  # too short a streak
    assert explosion_step([3.0] * 5 + [NAN]) == 5
    assert explosion_step([9.0] * 5 + [3.0] * 20) is None  # early training may move a lot


# --- recorded steps: warm-up in step numbers, patience in entries ---------------------------------------


def test_warmup_compares_step_numbers_and_patience_counts_entries():
    losses = [1.0] * 5 + [3.0] * 10
    # Every 5th step recorded: entries 5..14 are steps 25..70, past the warm-up; 10 entries suffice.
    assert explosion_step(losses, steps=[5 * i for i in range(15)]) == 25
    # Indices as steps: entries 5..19 would be before step 20, so the same losses do not explode.
    assert explosion_step(losses) is None
    # A run resumed at step 1000 has no warm-up left.
    assert explosion_step([1.0] + [3.0] * 10, steps=range(1000, 1011)) == 1001
    assert explosion_step([1.0] + [3.0] * 10, steps=range(1000, 1011), warmup=2000) is None


def test_nonpositive_running_minimum_has_no_scale():
    # Once the loss has reached 0 (or gone negative), no finite value counts as high...
    assert explosion_step([1.0] * 20 + [0.0] + [5.0] * 20) is None
    assert explosion_step([-1.0] * 20 + [-0.5] * 20) is None
    # ...but a non-finite one still does.
    assert explosion_step([-1.0] * 25 + [NAN]) == 25


def test_accepts_numpy_and_returns_python_int():
    losses = np.array([1.0] * 25 + [3.0] * 10, dtype=np.float32)
    got = explosion_step(losses, steps=np.arange(35, dtype=np.int64))
    assert got == 25 and type(got) is int
    assert type(explosion_step(losses)) is int


def test_bad_arguments_raise_config_errors():
    losses = _curve(30)
    for kwargs in ({"factor": 1.0}, {"factor": NAN}, {"patience": 0}, {"warmup": -1}):
        with pytest.raises(ConfigError):
            explosion_step(losses, **kwargs)
    with pytest.raises(ConfigError, match="differ in length"):
        explosion_step(losses, steps=[1, 2])
    with pytest.raises(ConfigError, match="strictly increasing"):
        explosion_step([1.0, 2.0, 3.0], steps=[0, 2, 2])
    with pytest.raises(ValueError):  # ConfigError is a ValueError: callers catching that keep working
        explosion_step(losses, factor=0.5)


values = st.one_of(
    st.floats(min_value=0.05, max_value=20.0),
    st.sampled_from([NAN, INF, 0.0, -1.0]),
)


@settings(max_examples=200, deadline=None)
@given(
    losses=st.lists(values, max_size=60),
    gap=st.integers(1, 3),
    offset=st.integers(0, 30),
    factor=st.sampled_from([1.5, 2.0, 3.0]),
    patience=st.integers(1, 12),
    warmup=st.integers(0, 25),
)
def test_matches_the_written_definition_and_is_online(losses, gap, offset, factor, patience, warmup):
    steps = [offset + gap * i for i in range(len(losses))]
    kw = {"factor": factor, "patience": patience, "warmup": warmup}
    got = explosion_step(losses, steps, **kw)
    assert got == _reference(losses, steps, **kw)
    # Online: the decision needs no future entry. Feeding a growing prefix first answers at the
    # explosion, with the same step, and never answers before.
    answers = [explosion_step(losses[: n + 1], steps[: n + 1], **kw) for n in range(len(losses))]
    first_answer = next((a for a in answers if a is not None), None)
    assert first_answer == got


def test_one_definition_everywhere():
    from benchmarks.explosions import explosion as suite
    from diagnostics.app import demo
    from diagnostics.reports import findings

    assert suite.explosion_step is explosion_step
    assert demo.explosion_step is explosion_step
    assert findings.explosion_step is explosion_step


def test_imports_without_torch():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
        return None
sys.meta_path.insert(0, Block())
from diagnostics.explosion import explosion_step
import diagnostics.reports.findings
assert explosion_step([1.0] * 25 + [3.0] * 10) == 25
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
