"""What spectral alignment's converging probe costs on the 3.2M-parameter GPT, against a warm step.

A probe more than ``refine_gap`` steps (default 20) after the previous one runs the power iteration to
convergence from the previous v_1 (:class:`diagnostics.metrics.spectral_alignment.SpectralAlignment`); a
schedule that spaces probes further apart (``every=50``, or the overhead budget) pays that at each probe.
This trains the overhead benchmark's large GPT with AdamW and two Monitors stepping the same model state in
turn, spectral alignment every 50 steps, one with the default ``refine_gap`` and one that never refines
(``refine_gap`` beyond the run), and prints the medians of the probes' stored ``monitor_seconds`` beside the
training step.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/sa_refine_cost.py [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.gpt_cases import LARGE_GPT
from benchmarks.overhead import LARGE_BATCH
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo.models import TinyGPT
from diagnostics.zoo.registry import get_data, get_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = TinyGPT(LARGE_GPT, seed=0)
    loss_fn = get_loss("tiny-gpt")
    data = get_data("pydoc-text", batch_size=LARGE_BATCH, num_batches=8, block_size=LARGE_GPT.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(f"3.2M GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{LARGE_BATCH}x{LARGE_GPT.block_size} tokens, spectral alignment every {args.every} steps")
    settings = {"refine (default refine_gap=20)": 20, "warm step only": 10**9}
    step_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        monitors = {label: Monitor(model, loss_fn, run=Path(tmp) / str(gap), optimizer=opt,
                                   diagnostics=[{"spectral_alignment": {"refine_gap": gap}}],
                                   every={"spectral_alignment": args.every})
                    for label, gap in settings.items()}
        for step in range(args.steps):
            batch = data[step % len(data)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            for mon in monitors.values():  # both see the same state: neither changes training
                mon.step(step, batch, loss)
            opt.step()
            if step % args.every:
                step_seconds.append(time.perf_counter() - t0)
        for mon in monitors.values():
            mon.close()
        step_s = statistics.median(step_seconds)
        print(f"median training step (no probe due): {step_s * 1e3:.0f} ms")
        for label, gap in settings.items():
            with open_run(Path(tmp) / str(gap)) as run:
                cost = run.series("monitor_seconds")
            sa = cost[cost["key"] == "spectral_alignment"].sort_values("step")
            later = sa[sa["step"] > 0]["value"]  # the first probe is a cold start either way
            print(f"  {label:<32} first probe {float(sa['value'].iloc[0]) * 1e3:7.1f} ms; later probes median "
                  f"{statistics.median(later) * 1e3:7.1f} ms (max {later.max() * 1e3:.1f}, n={len(later)}) "
                  f"= {statistics.median(later) / step_s:.1%} of a step")


if __name__ == "__main__":
    main()
