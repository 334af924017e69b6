"""The explosion detector the Monitor runs by default, as chosen by the loss-explosion benchmark.

``benchmarks/explosions/bench.py`` scores every candidate on held-out mechanisms; its ``select`` step
prints the detector below (features, threshold) from the recorded runs. Torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_METHOD", "DEFAULT_SIGNAL_DETECTOR"]

#: "signals" (:class:`~diagnostics.explosion.signal_detector.SignalDetectorCore`) or "spectral_alignment"
#: (:class:`~diagnostics.explosion.detector.ExplosionDetectorCore`).
DEFAULT_METHOD = "spectral_alignment"

#: Options of the signal detector (features as Feature keyword dicts, threshold, persistence).
DEFAULT_SIGNAL_DETECTOR: dict[str, Any] = {
    "features": [{"metric": "sa_sigma1", "key": "*", "transform": "log", "direction": "up", "method": "growth",
                  "window": 10}],
    "threshold": 0.5,
    "persistence": 1,
}
