"""Torch-free loss-explosion logic: the rule that dates an explosion, the detector core and offline detection.

The Monitor's diagnostics, ``tdiag``, the report and the benchmarks all call this one implementation.
"""

from diagnostics.explosion.detector import (
    STATISTICS,
    Alarm,
    ExplosionDetectorCore,
    detect,
    detect_probes,
    series_probes,
)
from diagnostics.explosion.rule import FACTOR, PATIENCE, WARMUP, explosion_step

__all__ = [
    # when did the loss explode
    "FACTOR",
    "PATIENCE",
    "WARMUP",
    "explosion_step",
    # early warning from spectral-alignment series
    "STATISTICS",
    "Alarm",
    "ExplosionDetectorCore",
    "detect",
    "detect_probes",
    "series_probes",
]
