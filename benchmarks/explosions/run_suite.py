"""Train every suite configuration x seed into its own run store, skipping runs already complete.

Usage (from the repository root; one core):

    python -m benchmarks.explosions.run_suite --out runs/explosions            # all configs, seeds 0 1 2
    python -m benchmarks.explosions.run_suite --out DIR --configs ramp1000 ramp100 --seeds 0
    python -m benchmarks.explosions.run_suite --out DIR --summary               # table of stored runs

Each run goes to ``OUT/<config>__s<seed>/run.sqlite`` (RunWriter store, every step recorded; see
trainer.py for the metrics). A run counts as complete when its store has meta ``complete``; incomplete
stores (a killed job) are retrained from scratch. ``OUT/summary.json`` lists, per run: config, seed,
expected label, explosion step, final step, peak ratio (max loss / running min after step 20: near
misses have a high ratio without an explosion), seconds. Detectors are then evaluated offline from the
stores (``diagnostics.store.open_runs``) with :func:`benchmarks.explosions.explosion.explosion_step`
as the ground truth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.explosions.configs import ALL, SEEDS, expected_label
from benchmarks.explosions.trainer import train

__all__ = ["run_suite", "summarise", "main"]


def peak_ratio(losses: list[float], min_step: int = 20) -> float:
    """max over steps >= min_step of loss / running minimum (inf if a loss is not finite).

    Flags near misses: a stable run with a peak ratio far above 2 had a large spike that did not last
    the 10 steps the explosion definition asks for.
    """
    run_min, peak = math.inf, 0.0
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            return math.inf
        run_min = min(run_min, v)
        if i >= min_step:
            peak = max(peak, v / run_min)
    return peak


def _stored_meta(run_dir: Path) -> dict | None:
    if not (run_dir / "run.sqlite").exists():
        return None
    from diagnostics.errors import StoreError
    from diagnostics.store import open_run

    try:
        with open_run(run_dir) as run:
            meta = run.meta
    except StoreError:
        return None
    return meta if meta.get("complete") else None


def summarise(out: Path) -> list[dict]:
    """One row per complete run under ``out``, sorted by config and seed; also written to summary.json."""
    rows = []
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        meta = _stored_meta(run_dir)
        if meta is None:
            continue
        cfg = meta["config"]
        from diagnostics.store import open_run

        with open_run(run_dir) as run:
            losses = run.series("loss").sort_values("step")["value"].tolist()
        rows.append(
            {
                "run": run_dir.name,
                "config": cfg["name"],
                "seed": cfg["seed"],
                "expected": expected_label(cfg["name"]),
                "explosion_step": meta.get("explosion_step"),
                "final_step": meta.get("final_step"),
                "peak_ratio": round(peak_ratio(losses), 2),
                "seconds": round(float(meta.get("seconds", float("nan"))), 2),
                "seconds_per_step": round(float(meta.get("seconds_per_step", float("nan"))), 4),
            }
        )
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return rows


def run_suite(out: Path, configs: list[str], seeds: list[int], *, force: bool = False) -> list[dict]:
    """Train the missing runs of ``configs`` x ``seeds`` into ``out``; return the summary rows."""
    torch.set_num_threads(1)  # one core per suite: the machine is shared
    out.mkdir(parents=True, exist_ok=True)
    for name in configs:
        for seed in seeds:
            cfg = ALL[name].with_seed(seed)
            run_dir = out / cfg.run_name
            if not force and _stored_meta(run_dir) is not None:
                print(f"skip {cfg.run_name} (complete)", flush=True)
                continue
            t0 = time.perf_counter()
            res = train(cfg, run_dir)
            print(
                f"{cfg.run_name:28s} explosion_step={res['explosion_step']} final_step={res['final_step']} "
                f"{time.perf_counter() - t0:.1f}s",
                flush=True,
            )
    return summarise(out)


def _table(rows: list[dict]) -> str:
    lines = [f"{'run':28s} {'expected':9s} {'explosion':>9s} {'final':>5s} {'peak':>6s} {'sec':>6s}"]
    for r in rows:
        lines.append(
            f"{r['run']:28s} {r['expected']:9s} {str(r['explosion_step']):>9s} {r['final_step']:>5d} "
            f"{r['peak_ratio']:>6.2f} {r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the run stores")
    parser.add_argument("--configs", nargs="*", default=list(ALL), help=f"subset of {list(ALL)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--force", action="store_true", help="retrain runs that are already complete")
    parser.add_argument("--summary", action="store_true", help="only print the table of stored runs")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in ALL]
    if unknown:
        print(f"unknown config(s) {unknown}; choose from {list(ALL)}", file=sys.stderr)
        return 2
    if args.summary:
        rows = summarise(args.out) if args.out.exists() else []
    else:
        rows = run_suite(args.out, args.configs, args.seeds, force=args.force)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
