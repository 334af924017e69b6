"""The detectors the explosion benchmark compares: per-step scores from one run's signals.

Each detector maps a :class:`~benchmarks.explosions.signals.RunSignals` and one of its settings to a
score per step (higher = more alarming, NaN = no opinion yet), using only the steps up to t. Signal
detectors share the four settings of :data:`~benchmarks.explosions.signals.SETTINGS` (the same tuning
budget for all); the trivial references have one setting; the learned combination is fitted in
score.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.explosions.signals import SETTINGS, RunSignals, score_signal

__all__ = ["Detector", "DETECTORS", "feature_matrix", "FEATURES", "library_feature"]


@dataclass(frozen=True)
class Detector:
    """A named score with its settings and a one-line description for the results table."""

    name: str
    settings: tuple[Any, ...]
    fn: Callable[[RunSignals, Any], np.ndarray]
    about: str


def _scalar(signal: str, kind: str, direction: str) -> Callable[[RunSignals, Any], np.ndarray]:
    from benchmarks.explosions.signals import SCALARS

    def fn(run: RunSignals, setting: Any) -> np.ndarray:
        return score_signal(run.scalars[signal], setting, kind, direction)

    fn.feature = (SCALARS[signal][0], SCALARS[signal][1], kind, direction)  # type: ignore[attr-defined]
    return fn


#: per-layer matrix of RunSignals -> the metric ID it was read from
_LAYER_METRIC = {"sigma1": "sa_sigma1", "sign_diversity": "sa_sign_diversity"}


def _layers_max(matrix: str, kind: str, direction: str) -> Callable[[RunSignals, Any], np.ndarray]:
    """Score each layer's series, then take the largest score over layers per step."""

    def fn(run: RunSignals, setting: Any) -> np.ndarray:
        mat = run.layers[matrix]
        if mat.shape[1] == 0:
            return np.full(run.steps, np.nan)
        cols = [score_signal(mat[:, j], setting, kind, direction) for j in range(mat.shape[1])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps stay NaN
            return np.nanmax(np.stack(cols, 1), axis=1)

    fn.feature = (_LAYER_METRIC[matrix], "*", kind, direction)  # type: ignore[attr-defined]
    return fn


def _layers_mean(matrix: str, kind: str, direction: str) -> Callable[[RunSignals, Any], np.ndarray]:
    """Average the per-layer series first (one whole-model series), then score it."""

    def fn(run: RunSignals, setting: Any) -> np.ndarray:
        mat = run.layers[matrix]
        if mat.shape[1] == 0:
            return np.full(run.steps, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            series = np.nanmean(mat, axis=1)
        return score_signal(series, setting, kind, direction)

    fn.feature = (_LAYER_METRIC[matrix], "*mean", kind, direction)  # type: ignore[attr-defined]
    return fn


def _sa_detector(run: RunSignals, setting: Any) -> np.ndarray:
    """The library's spectral-alignment detector core (diagnostics.explosion), its run-level score."""
    from diagnostics.explosion import ExplosionDetectorCore

    statistic, persistence = setting
    matrix = "sign_diversity" if statistic == "sa_sign_diversity" else "sigma1"
    core = ExplosionDetectorCore(statistic, persistence=persistence)
    state: dict[str, Any] = {}
    mat = run.layers[matrix]
    out = np.full(run.steps, np.nan)
    for t in range(run.steps):
        values = {name: float(mat[t, j]) for j, name in enumerate(run.layer_names) if not math.isnan(mat[t, j])}
        if values:
            score, _ = core.update(state, t, values)
            out[t] = score
    return out


def _trainscope(name: str) -> Callable[[RunSignals, Any], np.ndarray]:
    """trainscope's anomaly detector ``name`` (its defaults) fed the finite losses in order, as
    ``TrainScope.step`` feeds it; the score is 1 at steps within 10 after one of its alarms, else 0."""

    def fn(run: RunSignals, setting: Any) -> np.ndarray:
        from trainscope.core.detectors import make_detector

        det = make_detector({"name": name})
        out = np.zeros(run.steps)
        for t, v in enumerate(run.scalars["loss"]):
            if np.isfinite(v) and det.update(float(v)) is not None:
                out[t:t + 10] = 1.0
        return out

    return fn


def _trainscope_available() -> bool:
    try:
        import trainscope.core.detectors  # noqa: F401
    except ImportError:
        return False
    return True


def _learning_rate(run: RunSignals, setting: Any) -> np.ndarray:
    return run.scalars["lr"].astype(float)


def _step(run: RunSignals, setting: Any) -> np.ndarray:
    return np.arange(run.steps, dtype=float)


DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        Detector("loss", SETTINGS, _scalar("loss", "log", "up"), "log loss (spike)"),
        Detector("grad_norm", SETTINGS, _scalar("grad_norm", "log", "up"), "log gradient norm"),
        Detector("attn_logit_max", SETTINGS, _scalar("attn_logit_max", "slog", "up"),
                 "largest attention logit"),
        Detector("attn_entropy_min", SETTINGS, _scalar("attn_entropy_min", "raw", "down"),
                 "smallest head's attention entropy (falling)"),
        Detector("output_logit_max", SETTINGS, _scalar("output_logit_max", "slog", "up"),
                 "largest output logit"),
        Detector("output_log_z_max", SETTINGS, _scalar("output_log_z_max", "slog", "up"), "largest output log Z"),
        Detector("sigma1", SETTINGS, _layers_max("sigma1", "log", "up"), "per-layer log sigma_1, largest over layers"),
        Detector("adam_update_rms", SETTINGS, _scalar("adam_update_rms", "log", "up"), "Adam update RMS"),
        Detector("adam_update_grad_cosine", SETTINGS, _scalar("adam_update_grad_cosine", "raw", "both"),
                 "cosine of Adam's update to the gradient (either way)"),
        Detector("adam_small_grad_fraction", SETTINGS, _scalar("adam_small_grad_fraction", "raw", "up"),
                 "fraction of coordinates with g^2 < 0.01 v-hat"),
        Detector("sa_sign_diversity", SETTINGS, _layers_mean("sign_diversity", "raw", "down"),
                 "spectral alignment: mean sign diversity over layers (falling)"),
        Detector("sa_detector",
                 (("sa_sign_diversity", 3), ("sa_sign_diversity", 10), ("sa_sigma1", 3), ("sa_sigma1", 10)),
                 _sa_detector, "the library's spectral-alignment detector (statistic, persistence)"),
        Detector("learning_rate", (None,), _learning_rate, "trivial: the learning rate"),
        Detector("step", (None,), _step, "trivial: the step number"),
    )
}
# trainscope (the bench extra) reads only the loss; its detectors have one setting each, their defaults.
if _trainscope_available():
    for _name in ("z_score", "percentile", "changepoint"):
        DETECTORS[f"trainscope_{_name}"] = Detector(f"trainscope_{_name}", (None,), _trainscope(_name),
                                                     f"trainscope's {_name} detector on the loss (its defaults)")

#: (detector, setting) pairs whose scores are the features of the learned combination
FEATURES: tuple[tuple[str, Any], ...] = tuple(
    (name, setting)
    for name in ("loss", "grad_norm", "attn_logit_max", "attn_entropy_min", "output_logit_max", "output_log_z_max",
                 "sigma1", "adam_update_rms", "adam_update_grad_cosine", "adam_small_grad_fraction",
                 "sa_sign_diversity")
    for setting in (("z", 100), ("growth", 50))
)


def library_feature(name: str, setting: Any) -> dict[str, Any]:
    """The :class:`~diagnostics.explosion.signal_detector.Feature` options that score like detector ``name``
    at ``setting`` (for shipping); ValueError for detectors the library's features cannot express."""
    fn = DETECTORS[name].fn
    if not hasattr(fn, "feature"):
        raise ValueError(f"detector {name} has no single-feature form in the library")
    metric, key, kind, direction = fn.feature
    how, window = setting
    return {"metric": metric, "key": key, "transform": kind, "direction": direction, "method": how, "window": window}


def feature_matrix(run: RunSignals, cache: dict[tuple[str, str, Any], np.ndarray]) -> np.ndarray:
    """[steps, features]: the scores of :data:`FEATURES`, clipped to [-50, 50], NaN as 0."""
    cols = []
    for name, setting in FEATURES:
        key = (run.name, name, setting)
        if key not in cache:
            cache[key] = DETECTORS[name].fn(run, setting)
        cols.append(cache[key])
    x = np.stack(cols, 1)
    x = np.where(np.isnan(x), 0.0, x)
    return np.clip(x, -50.0, 50.0)
