"""Where a monitored ordinary step's extra time goes: two copies of a GPT, one monitored, stepped in turn.

``overhead.py`` times whole configurations in blocks of 50 steps; this times one monitored copy against one
plain copy of the same model step by step (the order alternating every step) and splits each step into the
user's forward and backward, ``monitor.step`` and ``optimizer.step()`` (where the Monitor's post-step hook
runs), in thread CPU time, with the step's process CPU and wall time and the minor page faults of each part.
Each phase then hands the Monitor to the other copy, so a difference that belongs to one model copy (where
its memory happens to lie) shows up as a difference between phases. Fixed schedules (``budget=None``); the
steps whose number is a multiple of 10 (where the ``standard`` preset's periodic diagnostics may run) are
left out, so what is compared is the ordinary step, where only the every-step diagnostics run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ordinary_steps.py [--model large|tiny] [--steps 30]
        [--diagnostics standard] [--phases 2]

``--diagnostics`` takes what ``Monitor(diagnostics=...)`` takes, comma-separated (``cheap,spectral_alignment``).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diagnostics.tracking import Monitor

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402

PARTS = ("forward and backward (thread CPU)", "monitor.step (thread CPU)", "optimizer.step (thread CPU)",
         "whole step (process CPU)", "whole step (wall)")
FAULTS = ("forward and backward", "monitor.step", "optimizer.step")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, batch: Any, step: int,
          monitor: Monitor | None) -> tuple[float, ...]:
    """One training step; its parts' seconds (:data:`PARTS`) and page faults (:data:`FAULTS`)."""
    f0, c0, p0, t0 = _faults(), time.thread_time(), time.process_time(), time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    c1, f1 = time.thread_time(), _faults()
    if monitor is not None:
        monitor.step(step, batch, loss)
    c2, f2 = time.thread_time(), _faults()
    opt.step()
    c3, p3, t3, f3 = time.thread_time(), time.process_time(), time.perf_counter(), _faults()
    return c1 - c0, c2 - c1, c3 - c2, p3 - p0, t3 - t0, f1 - f0, f2 - f1, f3 - f2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("large", "tiny"), default="large")
    ap.add_argument("--steps", type=int, default=30, help="steps per phase (each copy)")
    ap.add_argument("--diagnostics", default="standard")
    ap.add_argument("--phases", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, loss_fn, data = gpt_case(args.model, 8)
    copies = [copy.deepcopy(model) for _ in range(2)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in copies]
    tmp = Path(tempfile.mkdtemp(prefix="tdiag-ordinary-"))
    for i in range(5):
        for k in (0, 1):
            _step(copies[k], opts[k], loss_fn, data[i % len(data)], i, None)
    print(f"{args.model} GPT, diagnostics={args.diagnostics}, {args.steps} steps per phase, medians over the "
          "ordinary steps (step % 10 != 0)\n")
    print("| phase | monitored copy | part | monitored | plain | difference | share of the plain step |")
    print("|---|---|---|---|---|---|---|")
    for phase in range(args.phases):
        watched = phase % 2
        monitor = Monitor(copies[watched], loss_fn, run=tmp / f"phase{phase}",
                          diagnostics=args.diagnostics.split(","), optimizer=opts[watched], budget=None)
        rows: dict[int, list[tuple[float, ...]]] = {0: [], 1: []}
        for i in range(1, args.steps + 1):
            for k in ((0, 1) if i % 2 else (1, 0)):
                rows[k].append(_step(copies[k], opts[k], loss_fn, data[i % len(data)], i,
                                     monitor if k == watched else None))
        monitor.close()
        ordinary = {k: [r for n, r in enumerate(v, 1) if n % 10] for k, v in rows.items()}
        mon, plain = ordinary[watched], ordinary[1 - watched]
        step = statistics.median(r[3] for r in plain)
        for j, part in enumerate(PARTS):
            a, b = statistics.median(r[j] for r in mon), statistics.median(r[j] for r in plain)
            print(f"| {phase} | {watched} | {part} | {1e3 * a:.2f} ms | {1e3 * b:.2f} ms | {1e3 * (a - b):+.2f} ms "
                  f"| {100 * (a - b) / step:+.1f}% |")
        for j, part in enumerate(FAULTS, start=len(PARTS)):
            a, b = statistics.fmean(r[j] for r in mon), statistics.fmean(r[j] for r in plain)
            print(f"| {phase} | {watched} | page faults in {part}, mean | {a:.0f} | {b:.0f} | {a - b:+.0f} | |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
