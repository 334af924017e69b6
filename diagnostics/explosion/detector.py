"""The explosion detector's core: per-layer baselines, deviations, persistence and offline detection.

A layer whose inputs become one-sided along its top right singular vector lets gradient steps add up
along v_1 (docs/metrics.md, "Spectral alignment"); a collapse of its *sign diversity* is the warning.
Healthy layers differ a lot in their level (some, right after a LayerNorm or the LM head, are one-sided
from the start), so the detector never compares a layer with an absolute threshold alone:

1. **Baseline per layer.** After ``skip`` probes (initial transients), the next ``warmup`` probes of the
   statistic give a robust baseline: median b and scale s = 1.4826 * MAD (floored at ``min_scale``).
2. **Deviation.** At each later probe the statistic is smoothed by the median of the last ``smooth``
   probes, m_t. For sign diversity (it falls when a layer collapses) the drop is d_t = b - m_t; for
   statistics that rise (``sa_mean_abs``, ``sa_abs_mean`` = |sa_mean|) d_t = m_t - b; for ``sa_sigma1``
   d_t = log(m_t / b). The layer *deviates* when d_t >= threshold = max(min_drop, rel_drop * |b|,
   z * s). Layers whose baseline sits below ``min_baseline`` (already one-sided for sign diversity) are
   not eligible: they have nothing left to collapse.
3. **Persistence.** A layer alarms when it deviates for ``persistence`` consecutive probes; it re-arms
   once it has stopped deviating for ``persistence`` probes.
4. **Run level.** ``explosion_score`` = mean over eligible layers of min(1, max(0, d_t / threshold)),
   in [0, 1]; a warning fires (one per alarming layer) while at least ``min_layers`` layers are in
   alarm. Optionally (``burst_layers``) a probe where that many layers leave their baseline at once
   warns without waiting for persistence.

Definitions and rationale: docs/metrics.md, "Loss explosion". The same :class:`ExplosionDetectorCore`
runs online (the ``explosion_detector`` diagnostic, :mod:`diagnostics.metrics.explosion`, which the
Monitor runs right after ``spectral_alignment``) and offline through :func:`detect` on a stored series,
so calibration on stored runs tests exactly the code that warns in the loop.

Pure Python: no torch import, and pandas only in the type hints (``detect`` reads a DataFrame it is
given), so torch-free layers (the reports, the benchmark's evaluation) can use it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from diagnostics.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "STATISTICS",
    "Alarm",
    "ExplosionDetectorCore",
    "detect",
    "detect_probes",
    "series_probes",
]

#: Statistics the detector can watch: metric ID -> (field of the diagnostic's stats dict, direction).
STATISTICS: dict[str, tuple[str, str]] = {
    "sa_sign_diversity": ("sign_diversity", "down"),
    "sa_mean_abs": ("mean_abs", "up"),
    "sa_abs_mean": ("mean", "up_abs"),  # |sa_mean|: one-sidedness with a sign-free level
    "sa_sigma1": ("sigma1", "log_up"),
}


@dataclass(frozen=True)
class Alarm:
    """One layer's alarm: the step, the layer (map key), the statistic and the evidence."""

    step: int
    layer: str
    statistic: str
    value: float
    baseline: float
    scale: float
    drop: float
    threshold: float
    streak: int
    layers_in_alarm: int
    score: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExplosionDetectorCore:
    """The detector's logic on a plain state dict (JSON-serialisable); shared by the online and offline paths.

    Args:
        statistic: one of :data:`STATISTICS` (default ``sa_sign_diversity``).
        skip: probes ignored at the start of a layer's series (initial transients).
        warmup: probes forming the healthy baseline.
        smooth: probes in the running median the baseline is compared with.
        rel_drop: deviation threshold relative to the baseline level.
        min_drop: absolute floor of the threshold (in the statistic's units; log units for sigma1).
        z: threshold in robust standard deviations of the warm-up window.
        min_scale: floor of the robust scale.
        min_baseline: layers whose baseline is below this are not eligible (sign diversity only).
        persistence: consecutive deviating probes that make a layer alarm.
        min_layers: layers in alarm needed for a warning.
        burst_layers: if set, a probe at which at least this many eligible layers deviate at once (raw
            value, no smoothing or persistence) raises the warning immediately for those layers: a
            sudden whole-network collapse (e.g. after a learning-rate jump) leaves no time to persist.

    The defaults are the setting ``benchmarks/explosions/evaluate.py`` calibrated on the first explosion
    suite's seed 0 with at most one false alarm: sign diversity, min_drop 0.4, z 3, persistence 10,
    min_layers 2. The Monitor's default is now the signal detector the loss-explosion benchmark selected
    (:mod:`diagnostics.explosion.defaults`); on that benchmark this detector scores a held-out AUROC of
    0.31 (``benchmarks/RESULTS.md``, "Loss-explosion benchmark").

    Cost per probe: O(layers * smooth log smooth).
    """

    def __init__(
        self,
        statistic: str = "sa_sign_diversity",
        *,
        skip: int = 40,
        warmup: int = 60,
        smooth: int = 3,
        rel_drop: float = 0.5,
        min_drop: float = 0.4,
        z: float = 3.0,
        min_scale: float = 0.02,
        min_baseline: float = 0.3,
        persistence: int = 10,
        min_layers: int = 2,
        burst_layers: int | None = None,
    ) -> None:
        if statistic not in STATISTICS:
            raise ConfigError(
                f"explosion detector: statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}"
            )
        for name, v in (
            ("warmup", warmup),
            ("smooth", smooth),
            ("persistence", persistence),
            ("min_layers", min_layers),
        ):
            if int(v) < 1:
                raise ConfigError(f"explosion detector: {name} must be >= 1, got {v}")
        if int(skip) < 0 or rel_drop < 0 or min_drop < 0 or z < 0 or min_scale < 0:
            raise ConfigError("explosion detector: skip, rel_drop, min_drop, z and min_scale must be >= 0")
        self.statistic = statistic
        self.field, self.direction = STATISTICS[statistic]
        self.skip = int(skip)
        self.warmup = int(warmup)
        self.smooth = int(smooth)
        self.rel_drop = float(rel_drop)
        self.min_drop = float(min_drop)
        self.z = float(z)
        self.min_scale = float(min_scale)
        self.min_baseline = float(min_baseline)
        self.persistence = int(persistence)
        self.min_layers = int(min_layers)
        if burst_layers is not None and int(burst_layers) < 1:
            raise ConfigError(f"explosion detector: burst_layers must be >= 1 or None, got {burst_layers}")
        self.burst_layers = None if burst_layers is None else int(burst_layers)

    def settings(self) -> dict[str, Any]:
        """The detector's parameters (recorded in the run's metadata)."""
        keys = (
            "statistic",
            "skip",
            "warmup",
            "smooth",
            "rel_drop",
            "min_drop",
            "z",
            "min_scale",
            "min_baseline",
            "persistence",
            "min_layers",
            "burst_layers",
        )
        return {k: getattr(self, k) for k in keys}

    def _transform(self, value: float) -> float:
        if self.direction == "up_abs":
            return abs(value)
        if self.direction == "log_up":
            return math.log(value) if value > 0 else math.nan
        return value

    def _drop(self, base: float, m: float) -> float:
        return base - m if self.direction == "down" else m - base

    def update(self, state: dict[str, Any], step: int, values: dict[str, float]) -> tuple[float, list[Alarm]]:
        """Feed one probe: ``values`` = {layer: statistic}. Mutates ``state``; returns (score, new alarms).

        Non-finite values are ignored for the baseline; after the baseline they count as deviating (a
        layer whose inputs or weight became non-finite has certainly left its healthy range).
        """
        layers: dict[str, dict[str, Any]] = state.setdefault("layers", {})
        severities: list[float] = []
        candidates: list[tuple[str, dict[str, Any], float, float, float]] = []
        bursting: list[tuple[str, dict[str, Any], float, float, float]] = []
        for key, raw in values.items():
            ls = layers.setdefault(
                key,
                {
                    "seen": 0,
                    "warm": [],
                    "base": None,
                    "scale": None,
                    "recent": [],
                    "streak": 0,
                    "calm": 0,
                    "alarmed": False,
                },
            )
            v = self._transform(float(raw)) if raw is not None else math.nan
            ls["seen"] += 1
            if ls["base"] is None:
                if ls["seen"] > self.skip and math.isfinite(v):
                    ls["warm"].append(v)
                if len(ls["warm"]) >= self.warmup:
                    base = statistics.median(ls["warm"])
                    mad = statistics.median(abs(x - base) for x in ls["warm"])
                    ls["base"], ls["scale"] = base, max(self.min_scale, 1.4826 * mad)
                    ls["warm"] = []
                    ls["eligible"] = not (self.direction == "down" and base < self.min_baseline)
                continue
            if not ls.get("eligible", True):
                continue
            recent = ls["recent"]
            recent.append(v)
            del recent[: -self.smooth]
            finite = [x for x in recent if math.isfinite(x)]
            threshold = max(self.min_drop, self.rel_drop * abs(ls["base"]), self.z * ls["scale"])
            if len(finite) < len(recent) or not finite:
                m, drop = v, math.inf
            else:
                m = statistics.median(finite)
                drop = self._drop(ls["base"], m)
            deviating = drop >= threshold
            severities.append(1.0 if not math.isfinite(drop) else min(1.0, max(0.0, drop / threshold)))
            if deviating:
                ls["streak"] += 1
                ls["calm"] = 0
            else:
                ls["streak"] = 0
                ls["calm"] += 1
                if ls["alarmed"] and ls["calm"] >= self.persistence:
                    ls["alarmed"] = False  # re-arm after a sustained recovery
            raw_drop = math.inf if not math.isfinite(v) else self._drop(ls["base"], v)
            if ls["streak"] >= self.persistence:
                candidates.append((key, ls, m, drop, threshold))
            elif raw_drop >= threshold:
                bursting.append((key, ls, v, raw_drop, threshold))
        score = sum(severities) / len(severities) if severities else 0.0
        if self.burst_layers is not None and len(candidates) + len(bursting) >= self.burst_layers:
            candidates += bursting
        in_alarm = len(candidates)
        alarms: list[Alarm] = []
        if in_alarm >= self.min_layers:
            for key, ls, m, drop, threshold in candidates:
                if ls["alarmed"]:
                    continue
                ls["alarmed"] = True
                alarms.append(
                    Alarm(
                        int(step),
                        key,
                        self.statistic,
                        float(m),
                        float(ls["base"]),
                        float(ls["scale"]),
                        float(drop),
                        float(threshold),
                        int(ls["streak"]),
                        in_alarm,
                        float(score),
                    )
                )
        state["last_score"] = score
        return score, alarms


def detect(series_df: pd.DataFrame, **params: Any) -> list[dict[str, Any]]:
    """Run the detector offline over a stored series; the same logic as the online detector.

    Args:
        series_df: long-format series as returned by ``Run.series()`` (columns step, metric, key, index,
            value; one run). Rows of the detector's statistic (``sa_mean`` for ``sa_abs_mean``) with index
            0 are used, one probe per step in step order.
        **params: :class:`ExplosionDetectorCore` options.

    Returns:
        The alarms in order, as dicts (step, layer, statistic, value, baseline, scale, drop, threshold,
        streak, layers_in_alarm, score). Cost O(steps * layers).
    """
    core = ExplosionDetectorCore(**params)
    return detect_probes(series_probes(series_df, core.statistic), **params)


def series_probes(
    series_df: pd.DataFrame, statistic: str = "sa_sign_diversity"
) -> list[tuple[int, dict[str, float]]]:
    """The probes of one stored run for ``statistic``: ``[(step, {layer: value})]`` in step order.

    Rows that exist are grouped by step, so a stored NaN (a probe that saw non-finite values) is kept
    while a layer without a record at a step has no probe there. Cost O(rows log rows).
    """
    if statistic not in STATISTICS:
        raise ConfigError(
            f"explosion detector: statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}"
        )
    metric = "sa_mean" if statistic == "sa_abs_mean" else statistic
    df = series_df[(series_df["metric"] == metric) & (series_df["index"] == 0)]
    if "run" in df.columns and df["run"].nunique() > 1:
        raise ConfigError("detect() takes the series of one run; filter series_df by its 'run' column first")
    out = []
    for step, rows in df.sort_values("step", kind="stable").groupby("step", sort=True):
        out.append((int(step), {str(k): float(v) for k, v in zip(rows["key"], rows["value"])}))
    return out


def detect_probes(probes: list[tuple[int, dict[str, float]]], **params: Any) -> list[dict[str, Any]]:
    """:func:`detect` on probes already extracted by :func:`series_probes` (for calibration loops)."""
    core = ExplosionDetectorCore(**params)
    state: dict[str, Any] = {}
    alarms: list[dict[str, Any]] = []
    for step, values in probes:
        _, new = core.update(state, step, values)
        alarms += [a.as_dict() for a in new]
    return alarms
