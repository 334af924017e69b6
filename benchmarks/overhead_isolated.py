"""Monitoring overhead with each configuration in a fresh process, several times over.

``overhead.py`` steps every configuration's own copy of the model in one process, in interleaved blocks.
That removes the machine's drift, but not the copies' own speeds: where each copy's memory lies moves its
step by a few percent on the 3.2M GPT and by up to 40% on the tiny GPT (benchmarks/RESULTS.md, "The tiny
overhead benchmark on this code"). Here each configuration (``baseline``, ``cheap``, ``standard`` on fixed
schedules, ``standard-budget`` at its default 5% budget) runs alone in a fresh process with the same warm-up
and timed blocks as ``overhead.py``. The order of configurations turns every repeat, so placement and
drift fall on all of them alike. The overhead is taken from the medians over the repeats of each process's
mean CPU time per step (amortised) and median CPU time per step:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead_isolated.py [--model tiny-gpt|mlp-digits|large]
        [--repeats 3] [--rounds 4] [--budget-warmup 320] [--configs baseline,standard-budget]

Each process's figures are printed too, so the spread is visible. ``--config NAME --json`` runs one
configuration and prints its per-step times (what the parent runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402
from benchmarks.overhead import BLOCK, LARGE_BATCH, Runner  # noqa: E402

CONFIGS = ("baseline", "cheap", "standard", "standard-budget")


def _case(model: str) -> tuple[torch.nn.Module, Any, list[Any]]:
    """The model, loss and batches ``overhead.py`` uses for ``model``."""
    from diagnostics.zoo.registry import get_data, get_loss, get_model

    if model in ("large", "tiny-gpt"):
        return gpt_case("large" if model == "large" else "tiny", num_batches=8, batch_size=LARGE_BATCH)
    return get_model("mlp-digits"), get_loss("mlp-digits"), get_data("digits", batch_size=64, num_batches=8)


def run_one(model_name: str, config: str, rounds: int, budget_warmup: int) -> dict[str, Any]:
    """One configuration's warm-up and ``rounds`` timed blocks, as ``overhead.py`` runs them; its CPU
    seconds per timed step."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, loss_fn, data = _case(model_name)
    tmp = Path(tempfile.mkdtemp(prefix="tdiag-overhead-isolated-"))
    try:
        r = Runner(config, model, loss_fn, data, tmp)
        r.warm_up(budget_warmup)
        r.start_timing()
        for _ in range(rounds):
            r.block(BLOCK)
        r.close()
        return {"config": config, "cpu": r.cpu, "wall": r.times}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny-gpt", "mlp-digits", "large"), default="tiny-gpt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help=f"timed blocks of {BLOCK} steps per process")
    ap.add_argument("--budget-warmup", type=int, default=320)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="comma-separated configurations to compare (baseline always among them)")
    ap.add_argument("--config", choices=CONFIGS, help="run this configuration alone and print JSON")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.config is not None:
        print(json.dumps(run_one(args.model, args.config, args.rounds, args.budget_warmup)))
        return 0
    configs = tuple(c for c in CONFIGS if c == "baseline" or c in args.configs.split(","))
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    per: dict[str, list[tuple[float, float]]] = {c: [] for c in configs}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[: rep % len(configs)]
        for config in order:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--config", config,
                                  "--rounds", str(args.rounds), "--budget-warmup", str(args.budget_warmup)],
                                 check=True, capture_output=True, text=True, env=env)
            cpu = json.loads(out.stdout.strip().splitlines()[-1])["cpu"]
            per[config].append((statistics.fmean(cpu), statistics.median(cpu)))
            print(f"[repeat {rep + 1}/{args.repeats}] {config}: mean {1e3 * per[config][-1][0]:.2f} ms, "
                  f"median {1e3 * per[config][-1][1]:.2f} ms", file=sys.stderr, flush=True)
    base_mean = statistics.median(m for m, _ in per["baseline"])
    base_median = statistics.median(m for _, m in per["baseline"])
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead_isolated.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(f"### {args.model}: {args.repeats} processes per configuration, {args.rounds * BLOCK} timed steps each "
          "(CPU time)\n")
    print("| configuration | mean per step, each process (ms) | overhead, means (amortised) | "
          "overhead, medians |")
    print("|---|---|---|---|")
    for config in configs:
        means = ", ".join(f"{1e3 * m:.2f}" for m, _ in per[config])
        amortised = statistics.median(m for m, _ in per[config]) / base_mean - 1
        median = statistics.median(m for _, m in per[config]) / base_median - 1
        print(f"| {config} | {means} | {100 * amortised:+.1f}% | {100 * median:+.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
