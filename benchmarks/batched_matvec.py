"""A stack of matrices times one vector each: column form ``W @ v`` against row form ``v^T W^T``.

Spectral alignment's power step and its projections multiply stacks of weights (or of kept input rows)
by one vector per matrix. On the CPU, ``torch.bmm`` with a single column runs through a slow path; the
same products written as row vectors times matrices do not. This prints the median time of each form
for the shapes of the tiny GPT, the 3.2M GPT and GPT-2 small, one thread, in one process.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batched_matvec.py [--repeats 50]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

#: (stack size, rows, columns): tiny-GPT square maps, MLP maps, 3.2M GPT, GPT-2 small's MLP in and out.
SHAPES = [(8, 64, 64), (2, 256, 64), (4, 256, 256), (8, 256, 1024), (12, 768, 768), (12, 3072, 768)]


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_shape(g: int, o: int, i: int, repeats: int) -> list[float]:
    """Median microseconds of ``W v``, ``v^T W^T``, ``W^T u`` and ``u^T W`` for a ``[g, o, i]`` stack."""
    W = torch.randn(g, o, i)
    v, u = torch.randn(g, i, 1), torch.randn(g, o, 1)
    vt, ut = v.transpose(1, 2).contiguous(), u.transpose(1, 2).contiguous()
    return [
        _median_us(lambda: torch.bmm(W, v), repeats),
        _median_us(lambda: torch.bmm(vt, W.transpose(1, 2)), repeats),
        _median_us(lambda: torch.bmm(W.transpose(1, 2), u), repeats),
        _median_us(lambda: torch.bmm(ut, W), repeats),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median microseconds of {args.repeats}")
    print("| stack x rows x cols | W v (bmm, one column) | v^T W^T (one row) | W^T u (bmm, one column) "
          "| u^T W (one row) |")
    print("|---|---|---|---|---|")
    for g, o, i in SHAPES:
        cols = time_shape(g, o, i, args.repeats)
        print(f"| {g} x {o} x {i} | " + " | ".join(f"{c:,.0f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
