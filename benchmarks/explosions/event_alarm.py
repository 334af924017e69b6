"""One diagnostic's warning events taken as an explosion alarm, over the first explosion suite.

A diagnostic that raises warning events of its own (``edge_of_stability`` from ``sharpness``,
``rank_collapse`` from ``activation_rank``) can be read as an alarm: its first warning event of that kind.
:func:`train_with_alarm` trains one configuration of the suite (``configs.py``: each exploding
configuration beside a stable partner) with the Monitor running only the loss and that diagnostic on a
fixed schedule and a fixed probe batch, and returns the explosion step, the first alarm and one series of
the diagnostic. :func:`verdict` and :func:`summary` count

- for an exploding run: caught with its lead (explosion step - alarm step) when the alarm comes first;
- for a stable run: a false alarm.

The scripts that ask this of one diagnostic are ``sharpness_warning.py`` and ``rank_collapse_warning.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.explosions.configs import ALL, SEEDS
from benchmarks.explosions.run_with_monitor import lm_loss
from benchmarks.explosions.trainer import StopRule, TrainConfig, set_learning_rate, setup, update
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.data import char_batches, pydoc_tokens

__all__ = ["run_suite", "summary", "train_with_alarm", "verdict"]


def train_with_alarm(cfg: TrainConfig, run_dir: Path, diagnostic: str, every: int, kind: str,
                     metric: str) -> dict[str, Any]:
    """Train ``cfg`` with ``diagnostic`` every ``every`` steps.

    Returns ``run``, ``config``, ``seed``, ``explosion_step`` (None if it did not explode), ``alarm_step``
    and ``alarm_key`` (the first warning event of ``kind``, or None), ``seconds`` and ``series``:
    ``[(step, value)]`` of ``metric``, the median over its keys at each step (finite values only).
    Cost: the run's training plus the diagnostic's probes.
    """
    torch.set_num_threads(1)
    model, batches, opt = setup(cfg)
    probe = char_batches(pydoc_tokens("train"), cfg.batch_size, cfg.block_size, 1, seed=2000 + cfg.seed)
    rule = StopRule(cfg.stop_after_explosion)
    t0 = time.perf_counter()
    with Monitor(model, lm_loss, run=run_dir, diagnostics=["loss", diagnostic], every={diagnostic: every},
                 optimizer=opt, probe_data=probe, name=cfg.run_name) as mon:
        for step, batch in enumerate(batches):
            set_learning_rate(cfg, opt, step)
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(model, batch)
            loss.backward()
            mon.step(step, batch, loss)
            if rule.stop(step, float(loss.detach())):
                break
            update(cfg, model, opt)
    with open_run(run_dir) as run:
        events = run.events()
        values = run.series(metric)
    if not events.empty:
        events = events[(events["kind"] == kind) & (events["severity"] == "warning")].sort_values("step")
    first = events.iloc[0] if not events.empty else None
    finite = values[values["value"].map(math.isfinite)]
    medians = finite.groupby("step")["value"].median()
    return {"run": cfg.run_name, "config": cfg.name, "seed": cfg.seed, "explosion_step": rule.exploded_at,
            "alarm_step": int(first["step"]) if first is not None else None,
            "alarm_key": str(first["key"]) if first is not None else None,
            "seconds": time.perf_counter() - t0,
            "series": [(int(s), float(v)) for s, v in medians.items()]}


def verdict(r: dict[str, Any]) -> str:
    """"caught, lead N", "missed", "false alarm" or "quiet (correct)" for one run's row."""
    boom, alarm = r["explosion_step"], r["alarm_step"]
    if boom is None:
        return "false alarm" if alarm is not None else "quiet (correct)"
    if alarm is None or alarm > boom:
        return "missed"
    return f"caught, lead {boom - alarm}"


def summary(rows: list[dict[str, Any]]) -> str:
    """How many exploding runs the alarm caught (with the leads) and how many stable runs it alarmed."""
    exploding = [r for r in rows if r["explosion_step"] is not None]
    stable = [r for r in rows if r["explosion_step"] is None]
    caught = [r for r in exploding if r["alarm_step"] is not None and r["alarm_step"] <= r["explosion_step"]]
    leads = sorted(r["explosion_step"] - r["alarm_step"] for r in caught)
    alarmed = [r for r in stable if r["alarm_step"] is not None]
    return (f"exploding runs caught: {len(caught)} of {len(exploding)} (leads {leads}); "
            f"stable runs alarmed: {len(alarmed)} of {len(stable)}")


def run_suite(description: str, run_one: Callable[[TrainConfig, Path, int], dict[str, Any]],
              describe: Callable[[dict[str, Any]], str], argv: list[str] | None = None) -> list[dict[str, Any]]:
    """The command line of one alarm script: ``--out``, ``--configs``, ``--seeds``, ``--every``. Trains each
    configuration and seed with ``run_one(cfg, run_dir, every)``, prints ``describe(row)`` with the run's
    verdict and seconds, then :func:`summary`, and writes the rows to ``OUT/summary.json``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="*", default=list(ALL))
    ap.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.configs:
        for seed in args.seeds:
            cfg = ALL[name].with_seed(seed)
            run_dir = out / cfg.run_name
            shutil.rmtree(run_dir, ignore_errors=True)
            r = run_one(cfg, run_dir, args.every)
            rows.append(r)
            print(f"{describe(r)}  {verdict(r):<22} ({r['seconds']:.0f} s)", flush=True)
    print("\n" + summary(rows))
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows
