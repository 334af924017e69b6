"""The explosion detector the Monitor runs by default, as chosen by the loss-explosion benchmark.

``benchmarks/explosions/bench.py`` scores every candidate on held-out mechanisms; its ``select`` step
prints the detector below (features, threshold) from the recorded runs. Torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_METHOD", "DEFAULT_SIGNAL_DETECTOR"]

#: "signals" (:class:`~diagnostics.explosion.signal_detector.SignalDetectorCore`) or "spectral_alignment"
#: (:class:`~diagnostics.explosion.detector.ExplosionDetectorCore`).
DEFAULT_METHOD = "signals"

#: Options of the signal detector: the benchmark's selection (the best held-out per-step AUROC at H = 50
#: among the non-trivial detectors: the mean sign diversity over linear maps, falling, as a z-score against
#: its exponentially weighted history with a half-life of 100 probes), its threshold refitted on all 60
#: runs so that at most 10% of the 22 stable runs alarm. The benchmark scores steps from 30 on, so the
#: first score comes after 30 probes (the scores from there on are the benchmark's). ``python -m benchmarks.explosions.bench score
#: --runs DIR`` prints these options under "Selected default"; benchmarks/RESULTS.md has the scores.
DEFAULT_SIGNAL_DETECTOR: dict[str, Any] = {
    "features": [{"metric": "sa_sign_diversity", "key": "*mean", "transform": "raw", "direction": "down",
                  "method": "z", "window": 100, "min_obs": 30}],
    "threshold": 3.13,
    "persistence": 1,
}
