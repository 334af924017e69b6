"""Does an activation rank collapse warn of a loss explosion?

With its ranks every 20 steps the demo's exploding run raises ``rank_collapse`` warnings (a layer's
activation effective rank below 0.25 x its value at the first probe from step 100) from step 160, 32 steps
before its loss explodes, and its stable run (a constant learning rate) raises none. That pair does not
say whether a collapse is a warning: a learning rate ramped high but safely may collapse the ranks too.
This script asks the first explosion suite (each exploding configuration beside a stable partner that
ramps the learning rate less far, ``configs.py``) with the Monitor's ``activation_rank`` every
``--every`` steps on the step's batch: an alarm is the first ``rank_collapse`` warning event, and it
counts as a catch (with its lead) before an explosion and as a false alarm in a stable run
(:mod:`benchmarks.explosions.event_alarm`).

Usage (repository root, one core; about 10 s a run):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.explosions.rank_collapse_warning \\
        --out /tmp/rank_warn [--configs ...] [--seeds 0 1 2] [--every 10]

Prints one row per run and the summary; writes ``OUT/summary.json`` (rows with the median effective rank
over layers at each probe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.explosions.event_alarm import run_suite, train_with_alarm
from benchmarks.explosions.trainer import TrainConfig


def run_one(cfg: TrainConfig, run_dir: Path, every: int) -> dict[str, Any]:
    """Train ``cfg`` with ``activation_rank`` every ``every`` steps; the explosion step, the first collapse
    (and its layer) and the median effective rank over layers at each probe (``series``)."""
    return train_with_alarm(cfg, run_dir, "activation_rank", every, "rank_collapse", "activation_effective_rank")


def describe(r: dict[str, Any]) -> str:
    at_100 = next((v for s, v in r["series"] if s >= 100), float("nan"))
    lowest = min((v for s, v in r["series"] if s >= 100), default=float("nan"))
    where = f" ({r['alarm_key']})" if r["alarm_key"] else ""
    return (f"{r['run']:<24} explosion {str(r['explosion_step']):>5}  first collapse {str(r['alarm_step']):>5}"
            f"{where:<24}  median rank from step 100: {at_100:5.1f} -> lowest {lowest:5.1f} "
            f"({len(r['series'])} probes)")


def main(argv: list[str] | None = None) -> None:
    run_suite(__doc__.split("\n\n")[0], run_one, describe, argv)


if __name__ == "__main__":
    main()
