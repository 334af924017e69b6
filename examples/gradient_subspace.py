"""Gradient descent happens in a tiny subspace (Gur-Ari, Roberts, Dyer 2018), through the Monitor, with controls.

Mini-batch SGD (lr 0.1, batch 32, cross-entropy) on a ReLU MLP 64-64-64-10 on the digits training split
(1438 images), in three runs: pixel intensities scaled to [0, 1] (as MNIST in the paper), the zoo's
standardised inputs, and pixel inputs with uniformly random labels (control). Every ``--every`` steps
``hessian_top`` finds the top-10 Hessian eigenvectors of the full training loss (warm-started) and
``grad_subspace`` measures, through the step cache, the fraction of the full-batch gradient inside their
span and the fraction of SGD's actual update. At steps 100 and 1100 the top 20 eigenvectors are found
with ``lanczos`` on a ``HessianOperator``, and ``subspace_overlap`` compares the two probes' spans of
eigenvectors 1-10 (the top space) and of eigenvectors 11-20 (the next ten, in the bulk).

Claims (pixel inputs, the paper's setting): after warm-up (step >= 300) the median gradient fraction in
the top-10 space is above 0.8; and the top-10 space is preserved far better than the next ten directions:
``overlap(top 10 at 100, top 10 at 1100) >= 2 x overlap(11-20 at 100, 11-20 at 1100)``.
Controls, reported: standardised inputs (a less outlier-dominated spectrum) and random labels; two random
10-dimensional subspaces of the P = 9034 dimensions overlap about 10 / P = 0.001.

Run (one thread, about 1.5 minutes on the shared 2-core machine of examples/RESULTS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/gradient_subspace.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cross_entropy, digits, mlp, verdict  # noqa: E402

from diagnostics import HessianOperator, lanczos, subspace_overlap  # noqa: E402
from diagnostics.metrics.curvature import HessianTop  # noqa: E402
from diagnostics.metrics.subspace import GradSubspace  # noqa: E402
from diagnostics.store import open_run  # noqa: E402
from diagnostics.tracking import Monitor  # noqa: E402

FRACTION_MIN = 0.8
OVERLAP_FACTOR = 2.0


def top20(model: torch.nn.Module, full: tuple[torch.Tensor, torch.Tensor], seed: int) -> dict:
    res = lanczos(HessianOperator(model, cross_entropy, [full]), k=20, which="LA", tol=1e-3, seed=seed,
                  max_matvecs=800)
    return {"vectors": res.eigenvectors.detach().clone(), "eigenvalues": [float(v) for v in res.eigenvalues],
            "converged": int(res.converged.sum()), "matvecs": int(res.num_matvecs)}


def train(inputs: str, random_labels: bool, steps: int, every: int, k: int, pair: tuple[int, int], lr: float,
          batch_size: int, run_dir: Path) -> dict:
    x, y = digits(inputs, random_labels=0 if random_labels else None)
    full = (x, y)  # the probe set: the full-batch gradient and Hessian of the training loss
    model = mlp(64, depth=2, activation="relu", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    top = HessianTop(every=every, k=k, tol=1e-3)
    sub = GradSubspace(every=every, reference_step=pair[0])
    spaces = {}
    t0 = time.perf_counter()
    with Monitor(model, cross_entropy, run=run_dir, diagnostics=["loss", top, sub], optimizer=opt,
                 probe_data=[full], num_classes=10, strict=True) as monitor:
        for step in range(steps + 1):
            if step in pair:
                spaces[step] = top20(model, full, seed=step)
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
            batch = (x[idx], y[idx])
            opt.zero_grad()
            loss = cross_entropy(model, batch)
            loss.backward()
            monitor.step(step, batch, loss)
            opt.step()
    seconds = time.perf_counter() - t0
    run = open_run(run_dir)
    s = run.series()
    status = run.status()
    run.close()
    table = s[s.metric.isin(["grad_subspace_fraction", "update_subspace_fraction", "subspace_overlap_prev"])
              ].pivot_table(index="step", columns="metric", values="value")
    eig = s[s.metric == "hessian_eigenvalue"].pivot_table(index="step", columns="index", values="value")
    a, b = spaces[pair[0]], spaces[pair[1]]
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    top_status = status[status.diagnostic == "hessian_top"]
    return {
        "inputs": inputs, "random_labels": random_labels, "seconds": seconds, "table": table, "eig": eig,
        "accuracy": acc, "spaces": {st: {kk: v for kk, v in sp.items() if kk != "vectors"} for st, sp in spaces.items()},
        "overlap_top": subspace_overlap(a["vectors"][:, :10], b["vectors"][:, :10]),
        "overlap_next": subspace_overlap(a["vectors"][:, 10:20], b["vectors"][:, 10:20]),
        "not_converged": int((top_status.status != "ok").sum()), "probes": len(top_status),
        "dim": int(a["vectors"].shape[0]),
    }


def summarise(r: dict, warmup: int, say) -> dict:
    t = r["table"]
    after = t[t.index >= warmup]
    frac = after["grad_subspace_fraction"].dropna()
    upd = after["update_subspace_fraction"].dropna()
    label = f"{r['inputs']} inputs, {'random' if r['random_labels'] else 'real'} labels"
    say(f"\n{label}: {r['seconds']:.0f} s; train accuracy at the end {r['accuracy']:.3f}; hessian_top not converged "
        f"{r['not_converged']}/{r['probes']}")
    say("   step  lambda_1  lambda_10  grad_frac  update_frac  overlap_prev")
    for step in t.index[:: max(1, len(t.index) // 8)]:
        row = t.loc[step]
        say(f"  {step:5d}  {r['eig'].loc[step, 0]:8.3f}  {r['eig'].loc[step, 9]:9.3f}  {row.get('grad_subspace_fraction', float('nan')):9.3f}"
            f"  {row.get('update_subspace_fraction', float('nan')):11.3f}  {row.get('subspace_overlap_prev', float('nan')):12.3f}")
    out = {"frac": statistics.median(frac), "frac_min": float(frac.min()), "upd": statistics.median(upd)}
    say(f"  after warm-up (step >= {warmup}): gradient fraction in the top-10 space median {out['frac']:.3f} "
        f"(min {out['frac_min']:.3f}); SGD update fraction median {out['upd']:.3f}")
    for st, sp in r["spaces"].items():
        say(f"  step {st}: top-20 eigenvalues " + " ".join(f"{v:.3g}" for v in sp["eigenvalues"])
            + f"  [{sp['matvecs']} products, {sp['converged']}/20 converged]")
    steps = list(r["spaces"])
    ratio = r["overlap_top"] / r["overlap_next"] if r["overlap_next"] > 0 else float("inf")
    say(f"  overlap step {steps[0]} -> {steps[1]}: eigenvectors 1-10 {r['overlap_top']:.3f}, eigenvectors 11-20 "
        f"{r['overlap_next']:.3f}, ratio {ratio:.2f} (two random 10-dim subspaces: {10 / r['dim']:.4f})")
    out["overlap_ratio"] = ratio
    return out


def run(steps: int = 1100, every: int = 50, k: int = 10, pair: tuple[int, int] = (100, 1100), lr: float = 0.1,
        batch_size: int = 32, warmup: int = 300, out: Path | None = None, verbose: bool = True,
        configs: tuple[tuple[str, bool], ...] = (("pixels", False), ("standardized", False), ("pixels", True)),
        ) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    out = out or Path(tempfile.mkdtemp(prefix="subspace-"))
    say(f"SGD lr {lr}, batch {batch_size}, ReLU MLP 64-64-64-10 on 1438 digits, k = {k}, probes every {every} "
        f"steps; top-20 eigenvectors at steps {pair[0]} and {pair[1]}; runs in {out}")
    results = []
    for inputs, random_labels in configs:
        r = train(inputs, random_labels, steps, every, k, pair, lr, batch_size,
                  out / f"{inputs}-{'random' if random_labels else 'real'}")
        results.append((r, summarise(r, warmup, say)))
    main_r, main_s = results[0]
    checks = [("pixels, real: gradient fraction median", main_s["frac"], main_s["frac"] > FRACTION_MIN),
              ("pixels, real: overlap 1-10 / overlap 11-20", main_s["overlap_ratio"],
               main_s["overlap_ratio"] >= OVERLAP_FACTOR)]
    say(f"\nsummary (claims on pixel inputs with real labels: gradient fraction median > {FRACTION_MIN}; overlap ratio "
        f">= {OVERLAP_FACTOR})")
    for name, value, ok in checks:
        say(f"  {name:44s} {value:.3f}  {verdict(ok)}")
    say("  controls:")
    for r, s_ in results[1:]:
        say(f"    {r['inputs']} inputs, {'random' if r['random_labels'] else 'real'} labels: gradient fraction median "
            f"{s_['frac']:.3f}, overlap 1-10 {r['overlap_top']:.3f}, 11-20 {r['overlap_next']:.3f}, ratio "
            f"{s_['overlap_ratio']:.2f}")
    say("all checks:", verdict(all(ok for _, _, ok in checks)))
    return {"results": results, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--every", type=int, default=50, help="steps between probes")
    parser.add_argument("--warmup", type=int, default=300, help="steps counted as warm-up in the summary")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run(args.steps, args.every, 10, (100, args.steps), args.lr, args.batch_size, args.warmup, args.out)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
