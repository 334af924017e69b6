"""The ``explosion_detector`` diagnostic: loss-explosion early warning from spectral-alignment statistics.

The detection logic (baselines, deviation, persistence, offline :func:`detect`) is torch-free and lives
in :mod:`diagnostics.explosion.detector`; this module runs it in the loop on the statistics the
``spectral_alignment`` diagnostic publishes for the step (``ctx.alignment_statistics()``) and turns its
alarms into ``explosion_warning`` events. Definitions: docs/metrics.md, "Loss explosion".

The core's names are re-exported here so that ``from diagnostics.metrics.explosion import detect`` keeps
working.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from diagnostics.errors import ConfigError
from diagnostics.explosion.defaults import DEFAULT_METHOD, DEFAULT_SIGNAL_DETECTOR
from diagnostics.explosion.detector import (
    STATISTICS,
    Alarm,
    ExplosionDetectorCore,
    detect,
    detect_probes,
    series_probes,
)
from diagnostics.explosion.signal_detector import SignalAlarm, SignalDetectorCore
from diagnostics.metrics.base import Diagnostic, Output
from diagnostics.metrics.registry import register
from diagnostics.store.catalog import METRICS
from diagnostics.store.records import Event, Record

if TYPE_CHECKING:  # pragma: no cover
    from diagnostics.metrics.context import StepContext

__all__ = [
    "STATISTICS",
    "Alarm",
    "ExplosionDetectorCore",
    "ExplosionDetector",
    "alarm_event",
    "detect",
    "detect_probes",
    "series_probes",
]


def alarm_event(alarm: Alarm) -> Event:
    """The ``explosion_warning`` event (severity warning) of one layer's alarm; its data is the alarm."""
    return Event(
        kind="explosion_warning",
        severity="warning",
        metric=alarm.statistic,
        key=alarm.layer,
        message=(
            f"{alarm.layer}: {alarm.statistic} left its healthy baseline {alarm.baseline:.3g} "
            f"(now {alarm.value:.3g}, deviation {alarm.drop:.3g} >= {alarm.threshold:.3g}) for "
            f"{alarm.streak} probes at step {alarm.step}; {alarm.layers_in_alarm} layer(s) in alarm: "
            "a loss explosion may follow"
        ),
        data=alarm.as_dict(),
    )


def signal_alarm_event(alarm: SignalAlarm) -> Event:
    """The ``explosion_warning`` event of the signal detector's alarm; its data is the alarm."""
    top = sorted(alarm.features.items(), key=lambda kv: -abs(kv[1]) if kv[1] == kv[1] else 0.0)[:3]
    detail = ", ".join(f"{name} {value:.3g}" for name, value in top)
    return Event(
        kind="explosion_warning",
        severity="warning",
        metric="explosion_score",
        key="all",
        message=(f"explosion score {alarm.score:.3g} above its threshold {alarm.threshold:.3g} at step "
                 f"{alarm.step} ({detail}): a loss explosion may follow"),
        data=alarm.as_dict(),
    )


_SIGNAL_OPTIONS = ("features", "threshold", "weights", "bias", "center", "scale", "persistence")


@register
class ExplosionDetector(Diagnostic):
    """The explosion detector in the loop: ``explosion_score`` (key all) and ``explosion_warning`` events.

    It reads the statistics that ``spectral_alignment`` published this step (it never recomputes them);
    ``after = ("spectral_alignment",)`` makes the Monitor run it after that diagnostic, in the
    ``standard`` preset and in any list::

        Monitor(model, diagnostics=["spectral_alignment", ExplosionDetector(persistence=8, action="stop")], ...)

    When the statistics are absent (spectral alignment not selected or not due) it records nothing and
    says so in its status reason; when spectral alignment measured no map, its status is ``skipped``.
    ``explosion_score`` is recorded once any layer has a baseline.

    Args:
        every, start: schedule (default every step; a probe is a step at which both are due).
        action: "record" | "warn" | "checkpoint" | "stop" | callable(event, step), read by the Monitor.
        **params: options of :class:`~diagnostics.explosion.detector.ExplosionDetectorCore`.

    The detector's per-layer baselines and counters are its ``state`` (saved with the run, so a resumed
    run keeps its baselines). Cost per step: O(layers * smooth log smooth).
    """

    name = "explosion_detector"
    preset = "standard"
    default_every = 1
    reads_only = True
    allow_nonfinite = True  # the score of a signal that overflowed is +inf
    after: ClassVar[tuple[str, ...]] = ("spectral_alignment",)
    metrics: ClassVar[tuple[str, ...]] = ("explosion_score",)
    # The default method with a baseline after one probe, so that the contract suite's 3 steps record a
    # score (the spectral-alignment method has its own Monitor tests in tests/metrics).
    contract_options: ClassVar[dict[str, Any]] = {
        "method": "signals", "threshold": 3.0,
        "features": [{"metric": "sa_sign_diversity", "key": "*mean", "transform": "raw", "direction": "down",
                      "min_obs": 1}],
    }

    def __init__(self, every: int | None = None, start: int = 0, *, action: Any = None, method: str | None = None,
                 **params: Any) -> None:
        super().__init__(every, start)
        self.method = DEFAULT_METHOD if method is None else method
        if self.method == "spectral_alignment":
            self.core: ExplosionDetectorCore | None = ExplosionDetectorCore(**params)
            self.signal_core: SignalDetectorCore | None = None
        elif self.method == "signals":
            unknown = set(params) - set(_SIGNAL_OPTIONS)
            if unknown:
                raise ConfigError(f"explosion_detector(method='signals') takes {', '.join(_SIGNAL_OPTIONS)}; got "
                                  f"{sorted(unknown)} (spectral-alignment options need method='spectral_alignment')")
            spec = {**DEFAULT_SIGNAL_DETECTOR, **params} if "features" not in params else dict(params)
            if "threshold" not in spec:
                raise ConfigError("explosion_detector(method='signals', features=...) needs a threshold")
            features = spec.pop("features")
            self.core, self.signal_core = None, SignalDetectorCore(features, **spec)
            writers = []
            for metric, _ in self.signal_core.signals:
                spec_m = METRICS.get(metric)
                if spec_m is None or spec_m.diagnostic is None:
                    raise ConfigError(f"explosion_detector: no diagnostic writes the metric {metric!r}; use metric "
                                      "IDs of registered diagnostics (docs/metrics.md)")
                writers.append(spec_m.diagnostic)
            self.after = tuple(dict.fromkeys(writers))
        else:
            raise ConfigError(f"explosion_detector: method must be 'signals' or 'spectral_alignment', got {method!r}")
        if action is not None:
            self.action = action

    def settings(self) -> dict[str, Any]:
        core = self.core.settings() if self.core is not None else self.signal_core.settings()
        return {**super().settings(), "method": self.method, **core}

    def compute(self, ctx: StepContext) -> Output:
        if self.signal_core is not None:
            return self._compute_signals(ctx)
        stats = ctx.alignment_statistics()
        if stats is None:
            return Output(reason="no spectral_alignment statistics this step: spectral_alignment was not due")
        if not stats:
            # The cause (no linear map) is reported once by spectral_alignment itself as misuse.
            return Output(status="skipped", reason="spectral_alignment measured no linear map at this step")
        state = self.state.setdefault("detector", {})
        values = {key: st.get(self.core.field, math.nan) for key, st in stats.items()}
        score, alarms = self.core.update(state, ctx.step, values)
        has_base = any(ls.get("base") is not None for ls in state.get("layers", {}).values())
        records = [Record("explosion_score", float(score))] if has_base else []
        return Output(records=records, events=[alarm_event(a) for a in alarms])

    def _compute_signals(self, ctx: StepContext) -> Output:
        values: dict[tuple[str, str], float] = {}
        for metric, key in self.signal_core.signals:
            if key in ("*", "*mean"):
                values.update(ctx.recorded_keys(metric))
            else:
                v = ctx.recorded(metric, key)
                if v is not None:
                    values[(metric, key)] = v
        if not values:
            return Output(status="skipped", reason=(f"none of {', '.join(m for m, _ in self.signal_core.signals)} was recorded this "
                                  f"step: add {', '.join(self.after)} to the diagnostics, due at the same steps"))
        state = self.state.setdefault("signals", {})
        score, alarm = self.signal_core.update(state, ctx.step, values)
        records = [] if math.isnan(score) else [Record("explosion_score", float(score))]
        return Output(records=records, events=[] if alarm is None else [signal_alarm_event(alarm)])
