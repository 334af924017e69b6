"""GSNR's statistics: both summaries from one selection pass (``GradientMoments.summaries``) against
summarising the corrected and the raw ratios separately, on the same per-sample gradients, in one process.

Per model (the zoo's tiny GPT and the 3.2M GPT of ``benchmarks/gpt_cases.py``): one training step, the
per-sample gradients of the default 8 samples (``per_sample_gradients``), the moments, and the two ways
to summarise them; medians of ``--repeats`` interleaved timings, one thread.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_statistics.py [--repeats 7]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diagnostics.gradients import gradient_moments, gsnr_summary, per_sample_gradients
from diagnostics.metrics.gradient_stats import DEFAULT_GSNR_SAMPLES

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt_case  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(size: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of a training step, the per-sample gradients, the moments and both ways to
    summarise them, on the ``size`` GPT."""
    torch.manual_seed(0)
    model, loss_fn, data = gpt_case(size, num_batches=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = data[0]
    sub = tuple(t[:DEFAULT_GSNR_SAMPLES] for t in batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    grads = per_sample_gradients(model, loss_fn, sub)
    moments = gradient_moments(grads)
    parts = {
        "step": step,
        "psg": lambda: per_sample_gradients(model, loss_fn, sub),
        "moments": lambda: gradient_moments(grads),
        "two": lambda: (gsnr_summary(moments.gsnr()), gsnr_summary(moments.gsnr_raw())),
        "one": moments.summaries,
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for i in range(repeats + 1):
        for k, fn in parts.items():
            seconds = _timed(fn)
            if i:  # the first round warms the caches
                times[k].append(seconds)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {' '.join(sys.argv)}`\n")
    print("| model | step (ms) | per-sample gradients (ms) | moments (ms) | two summaries (ms) | "
          "summaries() (ms) | GSNR before / step | GSNR now / step |")
    print("|---|---|---|---|---|---|---|---|")
    for size in ("tiny", "large"):
        m = measure(size, args.repeats)
        before = (m["psg"] + m["moments"] + m["two"]) / m["step"]
        now = (m["psg"] + m["moments"] + m["one"]) / m["step"]
        print(f"| {size} GPT | {m['step']:.1f} | {m['psg']:.1f} | {m['moments']:.1f} | {m['two']:.1f} | "
              f"{m['one']:.1f} | {before:.2f}x | {now:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
