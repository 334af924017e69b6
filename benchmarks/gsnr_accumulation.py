"""Micro-batch GSNR from the user's gradient accumulation against the diagnostic's own passes.

One optimizer step of a zoo GPT with 8 accumulated micro-batches (the batch split in eighths), timed in
one process, interleaved: the training step alone; the same step with ``monitor.microbatch()`` after each
micro-batch (the moments read off ``.grad``); and ``gsnr_microbatch`` computed without them (8 forward
and backward passes of its own). Prints medians and the ratios to the training step.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_accumulation.py [--model-size tiny|large]
[--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diagnostics.gradients.accumulation import AccumulatedMoments
from diagnostics.metrics import get_diagnostic
from diagnostics.metrics.context import StepContext

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402

MICROBATCHES = 8


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-size", choices=("tiny", "large"), default="large")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, loss_fn, data = gpt_case(args.model_size, num_batches=4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    acc = AccumulatedMoments()
    diag = get_diagnostic("gsnr_microbatch", num_microbatches=MICROBATCHES)

    def accumulate(batch: object, observe: bool) -> float:
        """The micro-batches' backward passes; returns the seconds spent reading ``.grad`` after each."""
        opt.zero_grad(set_to_none=True)
        xs, ys = batch
        spent = 0.0
        for x, y in zip(xs.chunk(MICROBATCHES), ys.chunk(MICROBATCHES)):
            (loss_fn(model, (x, y)) / MICROBATCHES).backward()
            if observe:
                t = time.perf_counter()
                acc.observe(named)
                spent += time.perf_counter() - t
        return spent

    times: dict[str, list[float]] = {"step": [], "observe": [], "own": []}
    for i in range(args.repeats + 1):
        batch = data[i % len(data)]
        t0 = time.perf_counter()
        accumulate(batch, False)
        opt.step()
        step_seconds = time.perf_counter() - t0
        acc.reset()
        observing = accumulate(batch, True)
        t1 = time.perf_counter()
        moments = acc.moments()
        ratios = moments.microbatch_gsnr() if moments is not None else None
        observing += time.perf_counter() - t1
        t2 = time.perf_counter()
        out = diag.compute(StepContext(step=i, model=model, loss_fn=loss_fn, batch=batch, loss=None))
        own = time.perf_counter() - t2
        assert out.status == "ok" and ratios is not None and moments.n == MICROBATCHES
        if i:  # the first round warms up
            times["step"].append(step_seconds)
            times["observe"].append(observing)
            times["own"].append(own)
    step, observe, own = (statistics.median(times[k]) for k in ("step", "observe", "own"))
    params = sum(p.numel() for _, p in named)
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {' '.join(sys.argv)}`\n")
    print(f"{args.model_size} GPT, {params / 1e6:.2f}M parameters, batch 16 in {MICROBATCHES} micro-batches\n")
    print("| | median (ms) | / training step |")
    print("|---|---|---|")
    print(f"| training step (8 accumulated micro-batches + AdamW) | {step * 1e3:.1f} | 1.00 |")
    print(f"| reading .grad after each micro-batch (monitor.microbatch) + the GSNR ratios | {observe * 1e3:.1f} | "
          f"{observe / step:.3f} |")
    print(f"| gsnr_microbatch with its own 8 passes (no accumulation reported) | {own * 1e3:.1f} | {own / step:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
