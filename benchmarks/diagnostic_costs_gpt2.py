"""Seconds of each diagnostic's call on GPT-2 small (124M parameters) on the CPU.

Hugging Face GPT-2 small (random weights, tied embedding, SDPA, dropout off, AdamW), 4 x 128 tokens of the
stdlib help texts, a Monitor with the named diagnostics every step (``every=1``, no budget) for
``--steps`` steps; prints each diagnostic's stored ``monitor_seconds`` per step (a table: diagnostics by
steps). Curvature diagnostics can be named too, but take minutes here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnostic_costs_gpt2.py activation_rank,grad_rank,weight_rank

``benchmarks/run_from_tree.py TREE $PWD/benchmarks/diagnostic_costs_gpt2.py NAMES`` runs it against another
checkout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from diagnostics.metrics.registry import registry
from diagnostics.store import open_run
from diagnostics.tracking import Monitor

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt2_small_case, monitored_steps  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("diagnostics", help="comma-separated diagnostic names")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, loss_fn, data = gpt2_small_case(4, 128, args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diagnostics = [registry()[name](every=1) for name in args.diagnostics.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(model, loss_fn, Path(tmp) / "run", diagnostics=diagnostics, optimizer=opt, budget=None)
        for step, train_s, monitor_s in monitored_steps(model, loss_fn, data, opt, monitor):
            print(f"step {step}: forward+backward {train_s:.2f} s, monitor.step {monitor_s:.2f} s", flush=True)
        monitor.close()
        with open_run(Path(tmp) / "run") as run:
            seconds = run.series(metric="monitor_seconds")
    print(seconds.pivot_table(index="key", columns="step", values="value").round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
