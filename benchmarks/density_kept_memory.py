"""Stochastic Lanczos quadrature at P = 1.1M with its bases in fresh or kept memory.

The 1.1M-parameter MLP of ``curvature.py --model mlp1m``, 4 probes of 32 Lanczos steps, float32 products.
Three ways, alternating within each repeat: a basis allocated per call (one group of 4 probes, 576 MB),
the same in a ``BasisWorkspace`` kept from call to call (as the Monitor keeps it for ``hessian_density``),
and groups of one probe (``max_memory`` for one), whose later groups write where the first one did.
Prints bookkeeping (everything but the products) over product time per run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/density_kept_memory.py [--repeats 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curvature import TimedOperator, make_model  # noqa: E402

from diagnostics.curvature import HessianOperator  # noqa: E402
from diagnostics.linalg import BasisWorkspace, spectral_density  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--repeats", type=int, default=4)
args = ap.parse_args()
torch.set_num_threads(1)
model, data = make_model("mlp1m")
P = sum(p.numel() for p in model.parameters())
kept = BasisWorkspace()
res: dict[str, list[tuple[float, float, float, int, int]]] = {}
for _ in range(args.repeats):
    for label, kw in (("per call, one group of 4", {}), ("kept workspace, one group of 4", {"workspace": kept}),
                      ("per call, groups of 1", {"max_memory": (32 + 3) * P * 4})):
        H = TimedOperator(HessianOperator(model, None, data))
        t0 = time.perf_counter()
        sd = spectral_density(H, num_probes=4, steps=32, seed=0, **kw)
        tot = time.perf_counter() - t0
        res.setdefault(label, []).append(((tot - H.seconds) / H.seconds, tot, H.seconds,
                                          sd.settings["groups_in_kept_memory"], sd.settings["probe_group"]))
for label, rows in res.items():
    shares = [r[0] for r in rows]
    print(f"{label:34s} bookkeeping/products: runs {', '.join(f'{100 * s:.1f}%' for s in shares)}; "
          f"median after the first {100 * statistics.median(shares[1:] or shares):.1f}%; "
          f"products {statistics.median(r[2] for r in rows):.2f} s; groups in kept memory {[r[3] for r in rows]}; "
          f"probe group {rows[0][4]}")
