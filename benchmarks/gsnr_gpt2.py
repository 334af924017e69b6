"""GSNR inside the Monitor on GPT-2 small (124M parameters) on the CPU: seconds per call and peak memory.

Model: ``transformers.GPT2LMHeadModel(GPT2Config())`` with dropout off, SDPA attention, the embedding tied
with the output layer, random weights (``torch.manual_seed(0)``), train mode, AdamW; nothing is
downloaded. Data: ``--batch`` x ``--seq`` tokens of the stdlib help texts (the project's 96-symbol
character encoding). A Monitor with ``loss`` and ``gsnr`` every step (``max_samples=--samples``): step 0
takes GSNR's own pass (nothing captured yet), step 1 reads the training step and checks it once against
the own pass on two samples, the later steps read the training step only. Prints, per step, the training
forward and backward, ``monitor.step``, the peak resident memory of the process so far and (Linux) that of
the step alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gsnr_gpt2.py [--steps 4] [--batch 4] [--seq 128]

About 10 GB of memory and 2-3 minutes at the defaults. ``benchmarks/run_from_tree.py TREE
$PWD/benchmarks/gsnr_gpt2.py`` runs it against another checkout.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

from diagnostics.metrics.gradient_stats import GSNRDiagnostic
from diagnostics.tracking import Monitor

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt2_small_case, monitored_steps  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_step_peak() -> bool:
    """Restart the kernel's count of this process's peak resident memory (``VmHWM``; Linux), so that
    :func:`step_peak_gib` gives the peak of the step that follows. False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def step_peak_gib() -> float:
    """``VmHWM`` of this process in GiB: its peak resident memory since :func:`reset_step_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4, help="GSNR's max_samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, loss_fn, data = gpt2_small_case(args.batch, args.seq, args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gsnr = GSNRDiagnostic(every=1, max_samples=args.samples)
    print(f"GPT-2 small, P = {sum(p.numel() for p in model.parameters()):,}, batch {args.batch} x {args.seq} tokens, "
          f"GSNR over {args.samples} samples, torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(model, loss_fn, Path(tmp) / "run", diagnostics=["loss", gsnr], optimizer=opt)
        resettable = reset_step_peak()
        for step, train_s, monitor_s in monitored_steps(model, loss_fn, data, opt, monitor):
            this_step = f", this step's peak {step_peak_gib():.2f} GiB" if resettable else ""
            print(f"step {step}: forward+backward {train_s:.2f} s, monitor.step {monitor_s:.2f} s "
                  f"({monitor_s / train_s:.2f}x), source {gsnr.last_source}, peak RSS {peak_rss_gib():.2f} GiB"
                  f"{this_step}", flush=True)
            reset_step_peak()
        monitor.close()
    print(f"training step used: {gsnr.capture_agrees}" + (f" ({gsnr.capture_note})" if gsnr.capture_note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
