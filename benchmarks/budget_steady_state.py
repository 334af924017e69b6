"""The standard preset at its default budget in one uninterrupted run: what the Monitor itself measures.

Trains a zoo GPT through ``Monitor(diagnostics="standard")`` (5% budget) for ``--steps`` steps, one
thread, and reads back from the run's store:

* ``monitor_overhead`` (the Monitor's seconds over the training seconds of the last 200 or more steps)
  at the last step, its largest value over the steps past ``--warmup``, and its largest value over the
  windows that hold no first or second run of a probe (those runs are outside the budget by design): the
  worst trailing window the window check had to hold;
* the every-step part: the seconds of the diagnostics the budget does not schedule, over the training
  seconds (their share of the budget, which the scheduled probes cannot use);
* the scheduled diagnostics' runs after the warm-up.

Unlike ``benchmarks/overhead.py`` there are no interleaved configurations: this is what a user's run
reports about itself, not a comparison against a plain loop.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_steady_state.py [--model-size tiny|large]
[--steps 440] [--warmup 220]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.tracking.budget import budgeted

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", choices=("tiny", "large"), default="large")
    ap.add_argument("--steps", type=int, default=440)
    ap.add_argument("--warmup", type=int, default=220)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, loss_fn, data = gpt_case(args.model_size, num_batches=8)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        monitor = Monitor(model, loss_fn, run=run_dir, diagnostics="standard", optimizer=opt)
        scheduled = {d.name for d in monitor.diagnostics if budgeted(d)}
        t0 = time.perf_counter()
        outside: list[float] = []  # seconds of each step outside monitor.step (its update phase included)
        with monitor:
            for step in range(args.steps):
                batch = data[step % len(data)]
                a = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                loss.backward()
                b = time.perf_counter()
                monitor.step(step, batch, loss)
                c = time.perf_counter()
                opt.step()
                outside.append((b - a) + (time.perf_counter() - c))
        wall = time.perf_counter() - t0
        with open_run(run_dir) as run:
            overhead = run.series("monitor_overhead")
            stride = run.series("monitor_stride")
            status = run.status()
    late = status[status.step >= args.warmup]
    every_step = late[~late.diagnostic.isin(scheduled)].seconds.sum()
    runs = late[late.diagnostic.isin(scheduled)].groupby("diagnostic").size().to_dict()
    after = overhead[overhead.step >= args.warmup]
    # Windows that hold no run outside the budget: after every scheduled diagnostic's second run + 200 steps.
    sched = status[status.diagnostic.isin(scheduled)].sort_values("step")
    second = sched.groupby("diagnostic").step.nth(1)
    # A probe without its second run yet would still have one outside the budget to come.
    complete = len(second) == sched.diagnostic.nunique() > 0
    clean_from = int(second.max()) + 200 if complete else int(overhead.step.max()) + 1
    clean = overhead[overhead.step >= clean_from]
    # Training time of the late steps, the Monitor's update phase (in the optimizer's hook) included: an
    # upper bound of the training time, so the every-step share below is a lower bound.
    train_late = sum(outside[args.warmup:])
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {' '.join(sys.argv)}`\n")
    print(f"model: {args.model_size} GPT, {params / 1e6:.2f}M parameters; {args.steps} steps in {wall:.0f} s\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| monitor_overhead at step {int(overhead.step.max())} | {overhead.value.iloc[-1]:.1%} |")
    print(f"| largest monitor_overhead at steps {args.warmup}-{int(overhead.step.max())} | {after.value.max():.1%} |")
    print(f"| largest monitor_overhead in windows without first or second runs (steps {clean_from}-"
          f"{int(overhead.step.max())}) | {clean.value.max():.1%} |" if len(clean) else
          "| windows without first or second runs | none in this run |")
    print(f"| every-step diagnostics (not scheduled): ms per step, steps >= {args.warmup} | "
          f"{every_step / (args.steps - args.warmup) * 1e3:.2f} ms |")
    print(f"| ... over the step outside monitor.step (forward, backward, optimizer step) | "
          f"{every_step / train_late:.1%} |")
    late_stride = stride[stride.step >= args.warmup].value
    if len(late_stride):
        print(f"| every-step diagnostics' spacing (monitor_stride) at steps >= {args.warmup} | "
              f"{int(late_stride.min())}-{int(late_stride.max())} steps |")
    print(f"| scheduled runs at steps >= {args.warmup} | "
          f"{', '.join(f'{k} {v}' for k, v in sorted(runs.items())) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
