"""Early warning from whole-model training signals, each judged against the run's own recent past.

A :class:`Feature` turns one stored signal (a metric ID and key: the loss, the gradient norm, the largest
attention logit, ...) into a per-step score with a baseline learned from the run itself:

- transform: ``log`` (positive signals; a non-positive value gives NaN), ``slog`` = sign(x) log(1 + |x|),
  or ``raw``;
- method ``z`` (window = half-life h in probes): (y_t - m) / s, where m and s^2 are the exponentially
  weighted mean and variance of the finite values before t (weight 1 - 2^(-1/h)); s is floored at
  1e-3 |m| + 1e-8. The first ``min_obs`` finite values only build the baseline (score NaN). A
  non-finite value after that scores +inf: a signal that overflowed has left its range;
- method ``growth`` (window w): y_t - y_{t-w}, the change over the last w probes at which the signal
  was recorded (+inf for a non-finite value once w values are kept);
- direction: ``up`` keeps the score, ``down`` negates it, ``both`` takes its absolute value.

:class:`SignalDetectorCore` combines features into one score per probe: the feature's own score when
there is one feature, or a logistic decision value w . clip((f - c) / s) + b over several (NaN features
count as 0, the clip is at +-50). It alarms when the score exceeds ``threshold`` for ``persistence``
consecutive probes, and re-arms after as many probes below it. The benchmark that chose the default
(``benchmarks/explosions/bench.py``) scores exactly these features.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Feature", "SignalAlarm", "SignalDetectorCore", "detect_signals", "signal_probes"]

_TRANSFORMS = ("log", "slog", "raw")
_DIRECTIONS = ("up", "down", "both")
_METHODS = ("z", "growth")
CLIP = 50.0


@dataclass(frozen=True)
class Feature:
    """One signal's causal score (module docstring). ``window``: half-life (z) or lag (growth) in probes.

    ``key="*"`` scores every key of the metric (each layer, say) on its own baseline and takes the largest
    score over keys at each probe; ``key="*mean"`` scores the mean over keys at each probe (values that
    are NaN left out).
    """

    metric: str
    key: str = "all"
    transform: str = "log"
    direction: str = "up"
    method: str = "z"
    window: int = 100
    min_obs: int = 20

    def __post_init__(self) -> None:
        if self.transform not in _TRANSFORMS or self.direction not in _DIRECTIONS or self.method not in _METHODS:
            raise ConfigError(
                f"explosion feature {self.metric}: transform must be one of {_TRANSFORMS}, direction one of "
                f"{_DIRECTIONS}, method one of {_METHODS}; got {self.transform!r}, {self.direction!r}, {self.method!r}"
            )
        if int(self.window) < 1 or int(self.min_obs) < 1:
            raise ConfigError(f"explosion feature {self.metric}: window and min_obs must be >= 1")

    @property
    def name(self) -> str:
        return f"{self.metric}[{self.key}]:{self.method}{self.window}"

    def transformed(self, value: float) -> float:
        """The transform of a finite value (NaN where it is undefined: the log of a non-positive value)."""
        if self.transform == "log":
            return math.log(value) if value > 0 else math.nan
        if self.transform == "slog":
            return math.copysign(math.log1p(abs(value)), value)
        return value

    def update(self, state: dict[str, Any], value: float | None) -> float:
        """Feed this probe's value; returns the score (NaN: no opinion yet).

        None (not recorded at this probe) and a finite value whose transform is undefined leave the
        state as it was and score NaN; a non-finite value (the signal overflowed) scores +inf once the
        baseline exists. Cost O(1) (z) or O(window) (growth).
        """
        if value is None:
            return math.nan
        value = float(value)
        if not math.isfinite(value):
            raw = self._overflow(state)
        else:
            y = self.transformed(value)
            if math.isnan(y):
                return math.nan
            raw = self._z(state, y) if self.method == "z" else self._growth(state, y)
        if math.isnan(raw):
            return raw
        if self.direction == "down":
            return -raw
        if self.direction == "both":
            return abs(raw)
        return raw

    def _overflow(self, state: dict[str, Any]) -> float:
        if self.method == "z":
            return math.inf if state.get("seen", 0) >= self.min_obs else math.nan
        recent = state.get("recent", [])
        return math.inf if len(recent) >= self.window else math.nan

    def _z(self, state: dict[str, Any], y: float) -> float:
        seen = state.get("seen", 0)
        mean, var = state.get("mean", 0.0), state.get("var", 0.0)
        out = math.nan
        if seen >= self.min_obs:
            out = (y - mean) / (math.sqrt(var) + 1e-3 * abs(mean) + 1e-8)
        alpha = 1.0 - 0.5 ** (1.0 / self.window)
        if seen == 0:
            mean, var = y, 0.0
        else:
            d = y - mean
            mean += alpha * d
            var = (1 - alpha) * (var + alpha * d * d)
        state.update(seen=seen + 1, mean=mean, var=var)
        return out

    def _growth(self, state: dict[str, Any], y: float) -> float:
        recent = state.setdefault("recent", [])
        recent.append(y)
        if len(recent) <= self.window:
            return math.nan
        return y - recent.pop(0)


@dataclass(frozen=True)
class SignalAlarm:
    """The detector's alarm: the step, its score and threshold, and each feature's score then."""

    step: int
    score: float
    threshold: float
    streak: int
    features: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SignalDetectorCore:
    """Score per probe from :class:`Feature` s, alarm above ``threshold`` (module docstring).

    Args:
        features: the features (one: its score is the detector's score).
        threshold: alarm when the score exceeds it.
        weights, bias, center, scale: the logistic combination over several features (one weight, centre
            and scale per feature); required when there is more than one feature.
        persistence: consecutive probes above the threshold that make an alarm (and below it that re-arm).

    Cost per probe: O(features) (growth features keep ``window`` values each).
    """

    def __init__(
        self,
        features: Sequence[Feature],
        threshold: float,
        *,
        weights: Sequence[float] | None = None,
        bias: float = 0.0,
        center: Sequence[float] | None = None,
        scale: Sequence[float] | None = None,
        persistence: int = 1,
    ) -> None:
        self.features = [f if isinstance(f, Feature) else Feature(**f) for f in features]
        if not self.features:
            raise ConfigError("explosion detector: give at least one feature")
        n = len(self.features)
        if n > 1 and weights is None:
            raise ConfigError("explosion detector: several features need weights (a logistic combination)")
        for name, v in (("weights", weights), ("center", center), ("scale", scale)):
            if v is not None and len(v) != n:
                raise ConfigError(f"explosion detector: {name} has {len(v)} entries for {n} features")
        if int(persistence) < 1:
            raise ConfigError(f"explosion detector: persistence must be >= 1, got {persistence}")
        self.threshold = float(threshold)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.bias = float(bias)
        self.center = [0.0] * n if center is None else [float(c) for c in center]
        self.scale = [1.0] * n if scale is None else [float(s) if s > 0 else 1.0 for s in scale]
        self.persistence = int(persistence)

    def settings(self) -> dict[str, Any]:
        return {
            "features": [asdict(f) for f in self.features],
            "threshold": self.threshold,
            "weights": self.weights,
            "bias": self.bias,
            "center": self.center,
            "scale": self.scale,
            "persistence": self.persistence,
        }

    @property
    def signals(self) -> list[tuple[str, str]]:
        """The (metric, key) pairs the detector reads."""
        return list(dict.fromkeys((f.metric, f.key) for f in self.features))

    def combine(self, scores: Sequence[float]) -> float:
        """The detector's score from the features' scores."""
        if self.weights is None:
            return scores[0]
        total = self.bias
        for s, w, c, sc in zip(scores, self.weights, self.center, self.scale):
            v = 0.0 if math.isnan(s) else max(-CLIP, min(CLIP, s))
            total += w * (v - c) / sc
        return total

    def update(
        self, state: dict[str, Any], step: int, values: Mapping[tuple[str, str], float]
    ) -> tuple[float, SignalAlarm | None]:
        """Feed one probe (``values[(metric, key)]``; a missing one leaves its feature as it was). Mutates ``state``;
        returns (score, the alarm raised at this probe or None)."""
        per = state.setdefault("features", [{} for _ in self.features])
        scores = [_feature_score(f, st, values) for f, st in zip(self.features, per)]
        score = self.combine(scores)
        above = not math.isnan(score) and score > self.threshold
        streak = state.get("streak", 0) + 1 if above else 0
        calm = 0 if above else state.get("calm", 0) + 1
        alarmed = state.get("alarmed", False)
        if alarmed and calm >= self.persistence:
            alarmed = False
        alarm = None
        if above and streak >= self.persistence and not alarmed:
            alarmed = True
            alarm = SignalAlarm(int(step), float(score), self.threshold, streak,
                                {f.name: float(s) for f, s in zip(self.features, scores)})
        state.update(streak=streak, calm=calm, alarmed=alarmed, last_score=score)
        return score, alarm


def _feature_score(f: Feature, state: dict[str, Any], values: Mapping[tuple[str, str], float]) -> float:
    if f.key == "*mean":
        kept = [float(v) for (metric, _), v in values.items() if metric == f.metric and not math.isnan(v)]
        return f.update(state, sum(kept) / len(kept) if kept else None)
    if f.key != "*":
        return f.update(state, values.get((f.metric, f.key)))
    keyed = state.setdefault("keys", {})
    best = math.nan
    for (metric, key), value in values.items():
        if metric == f.metric:
            s = f.update(keyed.setdefault(key, {}), value)
            if not math.isnan(s) and (math.isnan(best) or s > best):
                best = s
    return best


def signal_probes(
    series_df: pd.DataFrame, signals: Sequence[tuple[str, str]]
) -> list[tuple[int, dict[tuple[str, str], float]]]:
    """``[(step, {(metric, key): value})]`` of one stored run for ``signals`` (index 0 rows), in step order;
    a step where none of them was recorded is not a probe. Cost O(rows log rows)."""
    if "run" in series_df.columns and series_df["run"].nunique() > 1:
        raise ConfigError("detect() takes the series of one run; filter series_df by its 'run' column first")
    wanted = set(signals)
    metrics = {m for m, _ in wanted}
    every_key = {m for m, k in wanted if k in ("*", "*mean")}
    df = series_df[series_df["metric"].isin(metrics) & (series_df["index"] == 0)]
    out: dict[int, dict[tuple[str, str], float]] = {}
    for step, metric, key, value in zip(df["step"], df["metric"], df["key"], df["value"]):
        if (metric, key) in wanted or metric in every_key:
            out.setdefault(int(step), {})[(str(metric), str(key))] = float(value)
    return sorted(out.items())


def detect_signals(series_df: pd.DataFrame, core: SignalDetectorCore) -> list[dict[str, Any]]:
    """Run ``core`` offline over a stored series; the alarms in order, as dicts. Cost O(steps * features)."""
    state: dict[str, Any] = {}
    alarms = []
    for step, values in signal_probes(series_df, core.signals):
        _, alarm = core.update(state, step, values)
        if alarm is not None:
            alarms.append(alarm.as_dict())
    return alarms
