"""What the overhead budget scheduled: runs and seconds per diagnostic of a ``standard`` run on the tiny GPT.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_schedule.py --steps 320 --budget 0.05

Trains the zoo's tiny GPT with AdamW under ``Monitor(diagnostics="standard", budget=...)`` and prints, from
the run store, how often each diagnostic ran, its total seconds and its last step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.registry import get_data, get_loss, get_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--budget", type=float, default=0.05)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, loss_fn = get_model("tiny-gpt"), get_loss("tiny-gpt")
    batches = get_data("pydoc-text", batch_size=16, num_batches=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        with Monitor(model, loss_fn, run=run, diagnostics="standard", optimizer=opt, budget=args.budget) as mon:
            for step in range(args.steps):
                batch = batches[step % len(batches)]
                opt.zero_grad()
                loss = loss_fn(model, batch)
                loss.backward()
                mon.step(step, batch, loss)
                opt.step()
        reader = open_run(run)
        status = reader.status()
        overhead = reader.series(metric="monitor_overhead")
        reader.close()
    table = status.groupby("diagnostic").agg(runs=("step", "count"), seconds=("seconds", "sum"), last=("step", "max"))
    print(table.sort_values("seconds").to_string())
    if len(overhead):
        print(f"monitor_overhead at the last step: {overhead.value.iloc[-1]:.3f} (budget {args.budget})")


if __name__ == "__main__":
    main()
