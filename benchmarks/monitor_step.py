"""Process CPU time of ``Monitor.step`` alone, on a zoo model trained with AdamW.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/monitor_step.py --model mlp-digits --preset cheap

Times only the Monitor's call (not the training step) on steps 20 to ``--steps``-1, so the Monitor's own
cost per step is read without the run-to-run spread of the training step that dominates
``benchmarks/overhead.py`` on small models. With ``benchmarks/run_from_tree.py`` it compares commits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diagnostics.tracking import Monitor
from diagnostics.zoo.registry import MODELS, get_data, get_loss, get_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp-digits", choices=sorted(MODELS))
    parser.add_argument("--preset", default="cheap")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, loss_fn = get_model(args.model), get_loss(args.model)
    batches = get_data(MODELS[args.model].data, num_batches=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(model, loss_fn, run=Path(tmp) / "run", diagnostics=args.preset, optimizer=opt)
        for step in range(args.steps):
            batch = batches[step % len(batches)]
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            t0 = time.process_time()
            monitor.step(step, batch, loss)
            t1 = time.process_time()
            opt.step()
            if step >= 20:
                times.append(t1 - t0)
        monitor.close()
    print(f"{args.model} {args.preset}: monitor.step CPU median {1e3 * statistics.median(times):.3f} ms, "
          f"mean {1e3 * statistics.mean(times):.3f} ms over {len(times)} steps")


if __name__ == "__main__":
    main()
