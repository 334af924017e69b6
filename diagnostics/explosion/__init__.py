"""Torch-free loss-explosion logic: the rule that dates an explosion, the detector core and offline detection.

The Monitor's diagnostics, ``tdiag``, the report and the benchmarks all call this one implementation.
"""

from diagnostics.explosion.rule import FACTOR, PATIENCE, WARMUP, explosion_step

__all__ = ["FACTOR", "PATIENCE", "WARMUP", "explosion_step"]
