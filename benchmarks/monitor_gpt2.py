"""The Monitor's cost per step on GPT-2 small (124M parameters) on the CPU, against the same training without it.

Two copies of Hugging Face GPT-2 small (random weights, tied embedding, SDPA, dropout off, AdamW) train on
the same batches of ``--batch`` x ``--seq`` tokens of the stdlib help texts, in alternating blocks of
``--steps`` steps (``--rounds`` rounds), one plain and one with a Monitor of ``--diagnostics`` (default the
``cheap`` preset, every diagnostic at its default schedule, no budget). A step is the forward, the backward,
``monitor.step`` and ``optimizer.step()`` (where the update's diagnostics run); the first round is warm-up.
Prints the medians of the step's CPU time for each copy, the overhead, and the median of ``monitor.step``
alone:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/monitor_gpt2.py [--diagnostics cheap] [--rounds 3] [--steps 3]

About 6 GB of memory and 3-4 minutes at the defaults; ``benchmarks/run_from_tree.py TREE
$PWD/benchmarks/monitor_gpt2.py`` runs it against another checkout.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from diagnostics.tracking import Monitor

# Run as a script (python benchmarks/NAME.py): the repository root holds the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gpt_cases import gpt2_small_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diagnostics", default="cheap", help="a preset or comma-separated diagnostic names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per block")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plain_model, loss_fn, data = gpt2_small_case(args.batch, args.seq, args.steps)
    monitored_model = copy.deepcopy(plain_model)
    diagnostics = args.diagnostics if "," not in args.diagnostics else args.diagnostics.split(",")
    cpu: dict[str, list[float]] = {"plain": [], "monitored": []}
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4)
                for name, m in (("plain", plain_model), ("monitored", monitored_model))}
        monitor = Monitor(monitored_model, loss_fn, Path(tmp) / "run", diagnostics=diagnostics,
                          optimizer=opts["monitored"], budget=None)
        step = 0
        for r in range(args.rounds):
            for name, model in (("plain", plain_model), ("monitored", monitored_model)):
                for i, batch in enumerate(data):
                    c0 = time.thread_time()
                    opts[name].zero_grad(set_to_none=True)
                    loss = loss_fn(model, batch)
                    loss.backward()
                    if name == "monitored":
                        m0 = time.thread_time()
                        monitor.step(step + i, batch, loss)
                        if r:
                            inside.append(time.thread_time() - m0)
                    opts[name].step()
                    if r:
                        cpu[name].append(time.thread_time() - c0)
            step += len(data)
        monitor.close()
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"GPT-2 small, {args.batch} x {args.seq} tokens, diagnostics {args.diagnostics!r}, "
          f"torch {torch.__version__}, 1 thread; medians of {len(cpu['plain'])} steps each (CPU time)")
    print(f"plain step {med['plain']:.3f} s, monitored step {med['monitored']:.3f} s: overhead "
          f"{med['monitored'] / med['plain'] - 1:+.1%}; monitor.step alone {statistics.median(inside):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
