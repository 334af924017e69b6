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

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.explosions.configs import ALL, SEEDS
from benchmarks.explosions.run_with_monitor import lm_loss
from benchmarks.explosions.trainer import StopRule, TrainConfig, set_learning_rate, setup, update
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.data import char_batches, pydoc_tokens


def run_one(cfg: TrainConfig, run_dir: Path, every: int) -> dict[str, Any]:
    """Train ``cfg`` with sharpness every ``every`` steps; the explosion step, the first alarm and the
    ratio series."""
    torch.set_num_threads(1)
    model, batches, opt = setup(cfg)
    probe = char_batches(pydoc_tokens("train"), cfg.batch_size, cfg.block_size, 1, seed=2000 + cfg.seed)
    rule = StopRule(cfg.stop_after_explosion)
    t0 = time.perf_counter()
    with Monitor(model, lm_loss, run=run_dir, diagnostics=["loss", "sharpness"], every={"sharpness": every},
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
        ratios = run.series("adam_sharpness_ratio")
    if not events.empty:
        events = events[(events["kind"] == "edge_of_stability") & (events["severity"] == "warning")]
    alarm = int(events["step"].min()) if not events.empty else None
    finite = ratios[ratios["value"].map(math.isfinite)]
    return {"run": cfg.run_name, "config": cfg.name, "seed": cfg.seed, "explosion_step": rule.exploded_at,
            "alarm_step": alarm, "seconds": time.perf_counter() - t0,
            "ratios": [(int(s), float(v)) for s, v in zip(finite["step"], finite["value"], strict=True)]}


def verdict(r: dict[str, Any]) -> str:
    boom, alarm = r["explosion_step"], r["alarm_step"]
    if boom is None:
        return "false alarm" if alarm is not None else "quiet (correct)"
    if alarm is None or alarm > boom:
        return "missed"
    return f"caught, lead {boom - alarm}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="*", default=list(ALL))
    ap.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
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
            after = [v for s, v in r["ratios"] if s >= 20]
            print(f"{r['run']:<24} explosion {str(r['explosion_step']):>5}  first crossing {str(r['alarm_step']):>5}  "
                  f"ratio from step 20: max {max(after, default=float('nan')):9.3g}  {verdict(r):<22} "
                  f"({r['seconds']:.0f} s)", flush=True)
    exploding = [r for r in rows if r["explosion_step"] is not None]
    stable = [r for r in rows if r["explosion_step"] is None]
    caught = [r for r in exploding if r["alarm_step"] is not None and r["alarm_step"] <= r["explosion_step"]]
    leads = sorted(r["explosion_step"] - r["alarm_step"] for r in caught)
    alarmed = [r for r in stable if r["alarm_step"] is not None]
    print(f"\nexploding runs caught: {len(caught)} of {len(exploding)} (leads {leads}); "
          f"stable runs alarmed: {len(alarmed)} of {len(stable)}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
