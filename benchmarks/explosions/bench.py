"""The loss-explosion benchmark: record the suite's runs, then score every detector on them.

Usage (repository root):

    # record every (mechanism, member, seed) run that is not yet complete (one core per worker)
    python -m benchmarks.explosions.bench record --out runs/bench [--quick] [--workers 2]
    # score the detectors on the complete runs; prints the tables and writes the JSON
    python -m benchmarks.explosions.bench score --runs runs/bench [--json benchmarks/explosions/bench_results.json]
    # a healthy pre-LN run outside the suite, and the default detector's alarms on it
    python -m benchmarks.explosions.bench healthy --out runs/bench
    # all three
    python -m benchmarks.explosions.bench all --out runs/bench [--quick]

The suite (family.py): five mechanisms plus a learning-rate ramp, each an exploding member and a twin
that differs in one knob, seeds 0-4. ``--quick`` records the seeds of ``QUICK`` only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "jobs"]


def jobs(quick: bool) -> list[tuple[str, int]]:
    """(config name, seed) of every run of the suite (or of ``--quick``)."""
    from benchmarks.explosions.family import MECHANISMS, QUICK, SEEDS

    if quick:
        return [(cfg.name, seed) for mech, seed in QUICK for cfg in MECHANISMS[mech]]
    return [(cfg.name, seed) for seed in SEEDS for pair in MECHANISMS.values() for cfg in pair]


def _record_one(args: tuple[str, int, str]) -> str:
    import torch

    from benchmarks.explosions.family import configs
    from benchmarks.explosions.record import train

    name, seed, out = args
    torch.set_num_threads(1)
    cfg = configs()[name].with_seed(seed)
    run_dir = Path(out) / cfg.run_name
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run is recorded again from the start
    res = train(cfg, run_dir)
    return f"{cfg.run_name:34s} explosion_step={res['explosion_step']} final={res['final_step']} {res['seconds']:.0f}s"


def _complete(run_dir: Path) -> bool:
    from diagnostics.store import open_run

    if not (run_dir / "run.sqlite").exists():
        return False
    try:
        with open_run(run_dir) as run:
            return bool(run.meta.get("complete"))
    except Exception:
        return False


def record(out: Path, quick: bool, workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    todo = [(n, s, str(out)) for n, s in jobs(quick) if not _complete(out / f"{n}__s{s}")]
    print(f"recording {len(todo)} runs into {out} with {workers} worker(s)", flush=True)
    t0 = time.perf_counter()
    if workers <= 1:
        for job in todo:
            print(_record_one(job), flush=True)
    else:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            for line in pool.imap_unordered(_record_one, todo):
                print(line, flush=True)
    print(f"recorded in {time.perf_counter() - t0:.0f}s", flush=True)


def load(runs_dir: Path, quick: bool = False) -> list[Any]:
    from benchmarks.explosions.family import MECHANISMS
    from benchmarks.explosions.signals import load_run

    members = {cfg.name: (mech, member) for mech, pair in MECHANISMS.items()
               for cfg, member in zip(pair, ("exploding", "stable"))}
    wanted = {f"{n}__s{s}" for n, s in jobs(quick)}
    out = []
    for d in sorted(runs_dir.iterdir()):
        if d.name in wanted and _complete(d):
            run = load_run(d, members)
            if run is not None:
                out.append(run)
    return out


def _fmt(v: float, iv: list[float] | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:.2f}"
    if iv is not None and not any(math.isnan(x) for x in iv):
        s += f" [{iv[0]:.2f}, {iv[1]:.2f}]"
    return s


def tables(res: dict[str, Any]) -> str:
    """Markdown: the runs per mechanism, the pooled table with intervals, AUROC@50 per mechanism."""
    from collections import defaultdict

    lines = ["## Runs", "", "| mechanism | member | explosion steps by seed |", "|---|---|---|"]
    by: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in res["runs"]:
        by[(r["mechanism"], r["member"])].append(f"s{r['seed']}: {r['explosion'] if r['explosion'] is not None else '–'}")
    for (mech, member), items in sorted(by.items()):
        lines.append(f"| {mech} | {member} | {', '.join(items)} |")
    n_exp = sum(r["explosion"] is not None for r in res["runs"])
    lines += ["", f"{len(res['runs'])} runs, {n_exp} exploded (– = no explosion).", "",
              "## Pooled over held-out mechanisms (95% bootstrap intervals over runs)", "",
              "| detector | AUROC H=10 | AUROC H=50 | AUROC H=200 | AUPRC H=50 | recall lead≥1 | lead≥10 | lead≥50 "
              "| stable runs alarmed | early alarms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    dets = res["detectors"]
    order = sorted(dets, key=lambda d: -(dets[d]["pooled"]["auroc_50"] if not math.isnan(dets[d]["pooled"]["auroc_50"]) else -1))
    for d in order:
        p, iv = dets[d]["pooled"], dets[d]["interval"]
        lines.append(
            f"| {d} | {_fmt(p['auroc_10'])} | {_fmt(p['auroc_50'], iv['auroc_50'])} | {_fmt(p['auroc_200'])} "
            f"| {_fmt(p['auprc_50'])} | {_fmt(p['recall_1'])} | {_fmt(p['recall_10'], iv['recall_10'])} "
            f"| {_fmt(p['recall_50'])} | {_fmt(p['false_alarms'], iv['false_alarms'])} | {_fmt(p['early_alarms'])} |")
    mechs = sorted({r["mechanism"] for r in res["runs"]})
    lines += ["", "## AUROC at H = 50 and recall at lead ≥ 10 per held-out mechanism", "",
              "| detector | " + " | ".join(mechs) + " |", "|---" * (len(mechs) + 1) + "|"]
    for d in order:
        pm = dets[d]["per_mechanism"]
        lines.append(f"| {d} | " + " | ".join(
            f"{_fmt(pm[m]['auroc_50'])} / {_fmt(pm[m]['recall_10'])}" for m in mechs) + " |")
    return "\n".join(lines)


def alignment_table(check: dict[str, Any]) -> str:
    """Markdown: Spearman correlations of (1 - sign diversity) with later and earlier sigma_1 growth."""
    from benchmarks.explosions.alignment_check import LAG

    lines = ["", f"## Does one-sidedness come before sigma_1 growth? (Spearman, lag {LAG} steps)", "",
             "| runs | (1 - sd_t) vs growth over the next steps: pooled / median per map | vs growth over the "
             "previous steps: pooled / median per map | maps |", "|---|---|---|---|"]
    for group, d in check.items():
        f, r = d["forward"], d["reversed"]
        lines.append(f"| {group} | {_fmt(f['pooled'])} / {_fmt(f['median_per_map'])} "
                     f"| {_fmt(r['pooled'])} / {_fmt(r['median_per_map'])} | {f['maps']} |")
    return "\n".join(lines)


def label_tables(res: dict[str, Any]) -> str:
    """Markdown: loss spikes per mechanism; the selected detector under other divergence rules."""
    from benchmarks.explosions.labels import SPIKE_FACTOR

    lines = ["", f"## Loss spikes (loss > {SPIKE_FACTOR} x the median of the 20 before it)", "",
             "| mechanism / member | runs | spikes that recovered | spikes followed by an explosion within 50 steps |",
             "|---|---|---|---|"]
    for name, row in res["spikes"].items():
        lines.append(f"| {name} | {row['runs']} | {row['recovered']} | {row['before_explosion']} |")
    lines += ["", f"## The divergence rule's factor and patience (selected detector, {res['selected']['winner']}, "
              "its setting refitted on all runs)", "", "| factor | patience | exploding runs | AUROC H=50 |",
              "|---|---|---|---|"]
    for row in res["label_sensitivity"]:
        lines.append(f"| {row['factor']} | {row['patience']} | {row['exploding_runs']} | {_fmt(row['auroc_50'])} |")
    return "\n".join(lines)


def score(runs_dir: Path, json_out: Path | None, quick: bool) -> dict[str, Any]:
    from benchmarks.explosions.alignment_check import sign_diversity_vs_sigma_growth
    from benchmarks.explosions.labels import label_sensitivity, spike_table
    from benchmarks.explosions.score import START, auroc, evaluate, select_default

    runs = load(runs_dir, quick)
    if not runs:
        raise SystemExit(f"no complete runs in {runs_dir}: record them first (bench record --out {runs_dir})")
    t0 = time.perf_counter()
    res = evaluate(runs)
    res["alignment_check"] = sign_diversity_vs_sigma_growth(runs)
    res["selected"] = select_default(runs, res)
    full_scores = res["selected"].pop("_full_scores")
    res["spikes"] = spike_table(runs)
    res["label_sensitivity"] = label_sensitivity(runs, full_scores, auroc, START)
    res["seconds"] = time.perf_counter() - t0
    print(tables(res))
    print(alignment_table(res["alignment_check"]))
    sel = res["selected"]
    print(f"\n## Selected default\n\n{sel['winner']} ({sel['method']}): held-out AUROC at H = 50 "
          f"{sel['heldout_auroc_50']:.3f} (95% lower bound {sel['heldout_auroc_50_lower']:.3f}) against the next "
          f"best, {sel['best_other']}, {sel['best_other_auroc_50']:.3f}: "
          f"{'above' if sel['beats_best_other'] else 'NOT above'}; recall at lead >= 10 "
          f"{sel['heldout_recall_10']:.2f} with {sel['heldout_false_alarms']:.0%} of stable runs alarmed "
          f"(target 0.7 at <= 10%: {'met' if sel['meets_recall_target'] else 'NOT met'}).\n"
          f"Options refitted on all runs: {json.dumps(sel['options'])}")
    print(label_tables(res))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1, default=str))
    return res


def healthy(out: Path) -> dict[str, Any]:
    """Record a healthy pre-LN run outside the suite (learning rate 3e-3, 1,200 steps, warm-up and cosine
    decay, seed 7) and run the library's default detector over it (the offline path, the same code as
    the Monitor's); prints and returns its alarms."""
    from dataclasses import replace

    import torch

    from benchmarks.explosions.family import BASE
    from benchmarks.explosions.record import train
    from diagnostics.explosion.defaults import DEFAULT_METHOD, DEFAULT_SIGNAL_DETECTOR
    from diagnostics.explosion.detector import detect
    from diagnostics.explosion.signal_detector import SignalDetectorCore, detect_signals, signal_probes
    from diagnostics.store import open_run

    torch.set_num_threads(1)
    cfg = replace(BASE, name="healthy-preln-lr3e-3", lr=3e-3, steps=1200, seed=7)
    run_dir = out / cfg.run_name
    if not _complete(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        train(cfg, run_dir)
    with open_run(run_dir) as run:
        series, meta = run.series(), run.meta
    peak = ""
    if DEFAULT_METHOD == "signals":
        core = SignalDetectorCore(**DEFAULT_SIGNAL_DETECTOR)
        alarms = detect_signals(series, core)
        state: dict[str, Any] = {}
        scores = [(core.update(state, step, values)[0], step) for step, values in signal_probes(series, core.signals)]
        top = max((sc for sc in scores if sc[0] == sc[0]), default=None)
        if top is not None:
            peak = f", highest score {top[0]:.2f} at step {top[1]} (threshold {core.threshold:.2f})"
    else:
        alarms = detect(series)
    loss = series[series.metric == "loss"]["value"]
    print(f"{cfg.run_name}: {meta['final_step'] + 1} steps, explosion step {meta['explosion_step']}, final loss "
          f"{loss.iloc[-1]:.3f}; default detector ({DEFAULT_METHOD}): {len(alarms)} alarm(s)"
          + (f" at steps {[a['step'] for a in alarms]}" if alarms else "") + peak)
    return {"run": cfg.run_name, "alarms": alarms, "explosion_step": meta["explosion_step"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["record", "score", "all", "healthy"])
    parser.add_argument("--out", "--runs", dest="out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.what in ("record", "all"):
        record(args.out, args.quick, args.workers)
    if args.what in ("score", "all"):
        score(args.out, args.json, args.quick)
    if args.what in ("healthy", "all"):
        healthy(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
