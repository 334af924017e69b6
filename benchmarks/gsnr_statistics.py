"""Where GSNR's time goes, against one training step: per-sample gradients by each method, moments,
summaries, in one process.

Per model (the zoo's tiny GPT and the 3.2M GPT of ``benchmarks/gpt_cases.py``, the zoo's digits MLP at
batch 64): one training step, the per-sample gradients of the default 8 samples by vmap and layer by
layer (``per_sample_gradients(method=...)``), the moments, and two ways to summarise them (both summaries
from one selection pass, ``GradientMoments.summaries``, against the corrected and the raw ratios
separately); medians of ``--repeats`` interleaved timings, one thread. GSNR / step is (per-sample
gradients + moments + ``summaries()``) / step for each method.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_statistics.py [--repeats 7]
[--models tiny large mlp]``
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
from diagnostics.zoo.registry import get_data, get_loss, get_model  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(size: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of a training step, the per-sample gradients by each method, the moments and
    both ways to summarise them, on the ``size`` model (``tiny`` or ``large`` GPT, ``mlp``)."""
    torch.manual_seed(0)
    if size == "mlp":
        model, loss_fn = get_model("mlp-digits"), get_loss("mlp-digits")
        data = get_data("digits", batch_size=64, num_batches=2)
    else:
        model, loss_fn, data = gpt_case(size, num_batches=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = data[0]
    sub = tuple(t[:DEFAULT_GSNR_SAMPLES] for t in batch)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()

    grads = per_sample_gradients(model, loss_fn, sub, method="vmap")
    moments = gradient_moments(grads)
    parts = {
        "step": step,
        "psg": lambda: per_sample_gradients(model, loss_fn, sub, method="vmap"),
        "layers": lambda: per_sample_gradients(model, loss_fn, sub, method="layers"),
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
    ap.add_argument("--models", nargs="+", default=["tiny", "large", "mlp"], choices=["tiny", "large", "mlp"])
    args = ap.parse_args(argv)
    print(f"Command: `OMP_NUM_THREADS=1 .venv/bin/python {' '.join(sys.argv)}`\n")
    print("| model | step (ms) | per-sample gradients, vmap (ms) | layer by layer (ms) | moments (ms) | "
          "two summaries (ms) | summaries() (ms) | GSNR / step, vmap | GSNR / step, layer by layer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.models:
        m = measure(size, args.repeats)
        rest = m["moments"] + m["one"]
        label = "digits MLP (batch 64)" if size == "mlp" else f"{size} GPT"
        print(f"| {label} | {m['step']:.2f} | {m['psg']:.2f} | {m['layers']:.2f} | {m['moments']:.2f} | "
              f"{m['two']:.2f} | {m['one']:.2f} | {(m['psg'] + rest) / m['step']:.2f}x | "
              f"{(m['layers'] + rest) / m['step']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
