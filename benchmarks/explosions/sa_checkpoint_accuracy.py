"""How close ``sa_sigma1`` from ``tdiag analyze`` is to an exact SVD of each checkpoint's weights.

    make demo
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/explosions/sa_checkpoint_accuracy.py [demo_output]

Reads the demo's ``stable-checkpoints`` run (the stable run's checkpoints, analysed with spectral
alignment among the other diagnostics) and, for every checkpoint and linear map, compares the stored
``sa_sigma1`` with the largest singular value of the checkpoint's weight (``torch.linalg.svdvals``, float64).
Prints the relative error per checkpoint (largest over the maps) and the map where it is largest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diagnostics.store import open_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path("demo_output"), help="the demo's output directory")
    args = ap.parse_args(argv)
    with open_run(args.out / "runs" / "stable-checkpoints") as run:
        stored = run.series("sa_sigma1")
    worst_all = 0.0
    for path in sorted((args.out / "checkpoints" / "stable").glob("*.pt")):
        ckpt = torch.load(path, weights_only=True)
        weights, step = ckpt["model"], int(ckpt["step"])
        rows = stored[stored.step == step]
        errors = {}
        for key, value in zip(rows.key, rows.value, strict=True):
            exact = float(torch.linalg.svdvals(weights[f"{key}.weight"].double())[0])
            errors[key] = (abs(value - exact) / exact, value, exact)
        key = max(errors, key=lambda k: errors[k][0])
        err, value, exact = errors[key]
        worst_all = max(worst_all, err)
        print(f"step {step:4d}: {len(errors)} maps, largest relative error {err:.2e} ({key}: stored {value:.4f}, "
              f"exact {exact:.4f})")
    print(f"largest relative error over all checkpoints: {worst_all:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
