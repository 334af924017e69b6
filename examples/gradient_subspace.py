"""Gradient descent happens in a tiny subspace (Gur-Ari, Roberts, Dyer 2018), reproduced through the Monitor.

Mini-batch SGD on a ReLU MLP (64-64-64-10) on the digits training split (1438 images, pixel intensities
scaled to [0, 1] as for MNIST in the paper; ``--inputs standardized`` uses the zoo's standardised
features instead) with cross-entropy.
Every ``--every`` steps ``hessian_top`` finds the top-10 Hessian eigenvectors of the full training loss
(warm-started from the previous probe) and ``grad_subspace`` measures, through the step cache, the
fraction of the full-batch gradient inside their span, the fraction of SGD's actual update, and the
overlap ``(1/k) Tr(P_t P_t')`` of the top subspace with the probe at ``--reference`` (step 100) and with
the previous probe. Gur-Ari et al. observe that after a short warm-up the gradient lies almost entirely
in the top-k subspace (k = number of classes) and that this subspace changes slowly.

Run (one thread, about a minute)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/gradient_subspace.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from diagnostics.metrics.curvature import HessianTop
from diagnostics.metrics.subspace import GradSubspace
from diagnostics.store import open_run
from diagnostics.tracking import Monitor
from diagnostics.zoo import get_model
from diagnostics.zoo.data import digits_arrays


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=25, help="steps between probes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reference", type=int, default=100, help="step of the reference probe")
    parser.add_argument("--warmup", type=int, default=300, help="steps counted as warm-up in the summary")
    parser.add_argument("--inputs", choices=["pixels", "standardized"], default="pixels")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="subspace-"))

    x, y = digits_arrays("train")
    if args.inputs == "pixels":
        # Undo the zoo's standardisation: raw 0..16 intensities of the same images, scaled to [0, 1].
        from sklearn.datasets import load_digits

        raw = torch.as_tensor(load_digits().data, dtype=torch.float64)
        perm = torch.randperm(raw.shape[0], generator=torch.Generator().manual_seed(20240101))
        x = (raw[perm[: x.shape[0]]] / 16.0).to(torch.float32)
    full = (x, y)  # the probe set: the full-batch gradient and Hessian of the training loss
    model = get_model("mlp-digits", hidden=(64, 64), activation="relu", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    top = HessianTop(every=args.every, k=args.k, tol=1e-3)
    sub = GradSubspace(every=args.every, reference_step=args.reference)
    t0 = time.perf_counter()
    with Monitor(model, cross_entropy, run=out, diagnostics=["loss", top, sub], optimizer=opt,
                 probe_data=[full], num_classes=10, strict=True) as monitor:
        for step in range(args.steps + 1):
            idx = torch.randint(0, x.shape[0], (args.batch_size,), generator=gen)
            batch = (x[idx], y[idx])
            opt.zero_grad()
            loss = cross_entropy(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
    seconds = time.perf_counter() - t0

    # Warm against cold on the same parameters: the final model, probed from the last probe's vectors
    # (warm) and by a fresh instance (cold).
    from diagnostics.metrics.context import StepContext

    def probe_cost(diag: HessianTop) -> tuple[int, list[float]]:
        ctx = StepContext(step=args.steps + 1, model=model, loss_fn=cross_entropy, batch=full, loss=None,
                          probe_data=[full], num_classes=10)
        out = diag.compute(ctx)
        return int(out.num_matvecs), [r.value for r in out.records if r.metric == "hessian_eigenvalue"]

    warm_mv, warm_ev = probe_cost(top)
    cold_mv, cold_ev = probe_cost(HessianTop(k=args.k, tol=1e-3))

    run = open_run(out)
    s = run.series()
    table = s[s.metric.isin(["grad_subspace_fraction", "update_subspace_fraction", "subspace_overlap_ref",
                             "subspace_overlap_prev", "grad_hessian_overlap"])].pivot_table(
        index="step", columns="metric", values="value")
    eig = s[s.metric == "hessian_eigenvalue"].pivot_table(index="step", columns="index", values="value")
    status = run.status()
    top_status = status[status.diagnostic == "hessian_top"]
    # Full-batch loss at each probe (the probe data is the whole training split).
    print(f"SGD lr={args.lr}, batch {args.batch_size}, ReLU MLP 64-64-64-10 on {x.shape[0]} digits, k={args.k}; "
          f"{seconds:.0f} s; run in {out}")
    print(" step  lambda_1  lambda_k  grad_frac  update_frac  cos(g,Hg)  overlap_ref  overlap_prev")
    for step in table.index:
        row = table.loc[step]

        def f(name: str, row: object = row) -> str:
            v = row.get(name) if hasattr(row, "get") else None
            return "    -" if v is None or v != v else f"{v:.3f}"

        print(f"{step:5d}  {eig.loc[step, 0]:8.3f}  {eig.loc[step, args.k - 1]:8.3f}  {f('grad_subspace_fraction'):>9}  "
              f"{f('update_subspace_fraction'):>11}  {f('grad_hessian_overlap'):>9}  {f('subspace_overlap_ref'):>11}  "
              f"{f('subspace_overlap_prev'):>12}")
    after = table[table.index >= args.warmup]
    frac = after["grad_subspace_fraction"].dropna()
    upd = after["update_subspace_fraction"].dropna()
    ref = table[table.index > args.reference]["subspace_overlap_ref"].dropna()
    print(f"\nhessian_top: {int(top_status.num_matvecs.iloc[0])} products cold (first probe), median "
          f"{top_status.num_matvecs.iloc[1:].median():.0f} warm-started; not converged: "
          f"{int((top_status.status != 'ok').sum())}/{len(top_status)}")
    print(f"final model, same parameters: warm-started probe {warm_mv} products, cold {cold_mv}; largest relative "
          f"eigenvalue difference {max(abs(a - b) / abs(b) for a, b in zip(warm_ev, cold_ev)):.1e}")
    print(f"after warm-up (step >= {args.warmup}): full-batch gradient fraction in the top-{args.k} space: median "
          f"{statistics.median(frac):.3f}, min {frac.min():.3f}; SGD update fraction: median {statistics.median(upd):.3f}")
    print(f"overlap of the top-{args.k} space with the step-{args.reference} probe, later probes: median "
          f"{statistics.median(ref):.3f}, last {ref.iloc[-1]:.3f}; with the previous probe: median "
          f"{table['subspace_overlap_prev'].dropna().median():.3f}")
    print("gradient fraction above 0.8 after warm-up (acceptance):",
          "PASS" if statistics.median(frac) > 0.8 else "FAIL")


if __name__ == "__main__":
    main()
