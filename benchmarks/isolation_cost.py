"""What state isolation costs per call, outermost against nested inside another isolated block.

The Monitor isolates each phase once (every global RNG stream forked, every module's mode restored); the
library calls a diagnostic makes inside it (``per_sample_gradients``, curvature products without a
cached linearisation) isolate themselves again, because they are public functions that promise to leave
the caller's state as found. A nested fork saves only the torch generators (numpy's and Python's are
left to the outermost fork). Times on the zoo's digits MLP (8 samples for the per-sample gradients),
minimum over 3 repeats of ``--number`` calls, one thread.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/isolation_cost.py``
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diagnostics._state import fork_global_rng, isolated  # noqa: E402
from diagnostics.gradients import per_sample_gradients  # noqa: E402
from diagnostics.zoo.registry import get_data, get_loss, get_model  # noqa: E402


def _us(fn: Callable[[], object], number: int) -> float:
    for _ in range(20):
        fn()
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, loss_fn = get_model("mlp-digits"), get_loss("mlp-digits")
    sub = tuple(t[:8] for t in get_data("digits", batch_size=64, num_batches=1)[0])

    def fork() -> None:
        with fork_global_rng():
            pass

    def iso() -> None:
        with isolated(model, "eval", grad=True):
            pass

    def grads() -> None:
        per_sample_gradients(model, loss_fn, sub)

    cases = [("fork_global_rng()", fork, args.number), ("isolated(model, 'eval')", iso, args.number),
             ("per_sample_gradients, digits MLP, 8 samples", grads, max(1, args.number // 4))]
    print("| call | outermost (us) | nested (us) |")
    print("|---|---|---|")
    for label, fn, number in cases:
        outer = _us(fn, number)
        with fork_global_rng():
            nested = _us(fn, number)
        print(f"| {label} | {outer:.1f} | {nested:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
