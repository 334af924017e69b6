"""Does Adam's preconditioned sharpness reaching its stability threshold warn of a loss explosion?

The demo's exploding run crosses ``adam_sharpness_ratio = 1`` 52 steps before its loss explodes, and its
stable run (a constant learning rate) never does. That pair does not say whether a crossing is a warning:
Adam is expected to train *at* the edge of stability (Cohen et al. 2022), so runs at a high but safe
learning rate may cross too. This script asks the first explosion suite (``configs.py``: each exploding
configuration beside a stable partner that ramps the learning rate less far) with the Monitor's
``sharpness`` diagnostic every ``--every`` steps, on a fixed probe batch: an alarm is the first
``edge_of_stability`` warning event (none fires while Adam's preconditioner settles), and it counts

- for an exploding run: caught with its lead (explosion step - alarm step) when the alarm comes first;
- for a stable run: a false alarm.

Usage (repository root, one core; about 30 s a run):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.explosions.sharpness_warning \
        --out /tmp/sharp_warn [--configs ...] [--seeds 0 1 2] [--every 10]

Prints one row per run and the summary; writes ``OUT/summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.explosions.event_alarm import run_suite, train_with_alarm
from benchmarks.explosions.trainer import TrainConfig


def run_one(cfg: TrainConfig, run_dir: Path, every: int) -> dict[str, Any]:
    """Train ``cfg`` with sharpness every ``every`` steps; the explosion step, the first alarm and the
    ratio series (``ratios``)."""
    r = train_with_alarm(cfg, run_dir, "sharpness", every, "edge_of_stability", "adam_sharpness_ratio")
    r["ratios"] = r.pop("series")
    r.pop("alarm_key")
    return r


def describe(r: dict[str, Any]) -> str:
    after = [v for s, v in r["ratios"] if s >= 20]
    return (f"{r['run']:<24} explosion {str(r['explosion_step']):>5}  first crossing {str(r['alarm_step']):>5}  "
            f"ratio from step 20: max {max(after, default=float('nan')):9.3g}")


def main(argv: list[str] | None = None) -> None:
    run_suite(__doc__.split("\n\n")[0], run_one, describe, argv)


if __name__ == "__main__":
    main()
