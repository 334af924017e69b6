"""Hessian outliers match the number of classes (Sagun, Bottou, LeCun 2017; Papyan 2019).

Mini-batch SGD (lr 0.1, batch 64, cross-entropy) trains ReLU MLPs 64-w-w-C of widths 32, 64 and 128 on the
1438 digits of the training split (pixel intensities in [0, 1], as MNIST in the papers; the zoo's
standardised inputs are reported too); at steps 100, 300, 1000 and 2000 the top 30 eigenvalues of the
Hessian of the training loss are found with ``lanczos`` on a ``HessianOperator`` over the whole split.
The spectrum is a bulk near 0 plus about C outliers (C classes; C - 1 with cross-entropy, whose logit
Hessian has rank C - 1), so the largest gap between consecutive eigenvalues on a log scale,
``max_i log(lambda_i / lambda_{i+1})`` over i = 1..29, should sit after eigenvalue C or C - 1.

Claim, read at step 300 (train loss 0.2-0.35), pixel inputs: with the 10 digit classes the largest
log-gap is at index 10 +- 1 for every width.
Control: relabelled into 5 classes (digit mod 5), it moves to 5 +- 1.
The other probes show where the claim stops holding: as the softmax saturates (train loss below about
0.05) the outliers shrink into the bulk.

Run (one thread, about 2.5 minutes on the shared 2-core machine of examples/RESULTS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/hessian_outliers.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cross_entropy, digits, mlp, verdict  # noqa: E402

from diagnostics import HessianOperator, lanczos  # noqa: E402

TOP = 30


def largest_log_gap(eigenvalues: list[float]) -> tuple[int, float]:
    """``(i, log(lambda_i / lambda_{i+1}))`` of the largest gap, i 1-based, over the positive eigenvalues."""
    pos = [v for v in eigenvalues if v > 0]
    gaps = [math.log(pos[i] / pos[i + 1]) for i in range(len(pos) - 1)]
    i = max(range(len(gaps)), key=gaps.__getitem__)
    return i + 1, gaps[i]


def train_and_probe(width: int, classes: int, seed: int, probes: tuple[int, ...], lr: float, batch_size: int,
                    inputs: str) -> dict:
    """Train with SGD and find the top 30 eigenvalues at each step of ``probes``."""
    x, y = digits(inputs, classes=classes)
    model = mlp(width, depth=2, classes=classes, activation="relu", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    out = {}
    for step in range(1, max(probes) + 1):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        opt.zero_grad()
        cross_entropy(model, (x[idx], y[idx])).backward()
        opt.step()
        if step not in probes:
            continue
        with torch.no_grad():
            loss = float(cross_entropy(model, (x, y)))
            acc = float((model(x).argmax(1) == y).float().mean())
        H = HessianOperator(model, cross_entropy, [(x, y)])
        res = lanczos(H, k=TOP, which="LA", tol=1e-4, seed=seed, max_matvecs=600)
        ev = [float(v) for v in res.eigenvalues]
        where, gap = largest_log_gap(ev)
        out[step] = {"loss": loss, "accuracy": acc, "eigenvalues": ev, "gap_index": where, "gap": gap,
                     "converged": int(res.converged.sum()), "matvecs": int(res.num_matvecs)}
    return {"width": width, "classes": classes, "inputs": inputs, "probes": out,
            "seconds": time.perf_counter() - t0}


def run(widths: tuple[int, ...] = (32, 64, 128), classes: tuple[int, ...] = (10, 5), seed: int = 0,
        probes: tuple[int, ...] = (100, 300, 1000, 2000), claim_step: int = 300, lr: float = 0.1,
        batch_size: int = 64, inputs: tuple[str, ...] = ("pixels", "standardized"), verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    say(f"SGD lr {lr}, batch {batch_size}, ReLU MLP 64-w-w-C on 1438 digits; top {TOP} Hessian eigenvalues of "
        f"the training loss at steps {', '.join(map(str, probes))}; the claim is read at step {claim_step} "
        f"on {inputs[0]} inputs")
    results, checks = [], []
    for inp in inputs:
        for c in classes:
            for w in widths:
                r = train_and_probe(w, c, seed, probes, lr, batch_size, inp)
                results.append(r)
                say(f"\n{inp} inputs, C={c}, width {w} ({r['seconds']:.0f} s)")
                for step, p in r["probes"].items():
                    ev = p["eigenvalues"]
                    ratios = " ".join(f"{ev[i] / ev[i + 1]:.2f}" if ev[i + 1] > 0 else "-" for i in range(12))
                    say(f"  step {step:5d}: loss {p['loss']:.3f} acc {p['accuracy']:.3f}; lambda_1 {ev[0]:.3g}, "
                        f"lambda_30 {ev[-1]:.3g}; largest log-gap after {p['gap_index']:2d} ({p['gap']:.2f}); "
                        f"lambda_i/lambda_i+1, i=1..12: {ratios}  [{p['matvecs']} products, "
                        f"{p['converged']}/{TOP} converged]")
                if inp == inputs[0]:
                    idx = r["probes"][claim_step]["gap_index"]
                    checks.append((f"C={c} width {w}", idx, abs(idx - c) <= 1))
    say(f"\nsummary: index of the largest log-gap among the top {TOP} eigenvalues at step {claim_step}, "
        f"{inputs[0]} inputs (tolerance: C +- 1)")
    for name, value, ok in checks:
        say(f"  {name:16s} {value:3d}  {verdict(ok)}")
    say("all checks:", verdict(all(ok for _, _, ok in checks)))
    return {"results": results, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, nargs="+", default=[100, 300, 1000, 2000])
    parser.add_argument("--claim-step", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inputs", nargs="+", choices=["standardized", "pixels"], default=["pixels", "standardized"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run(tuple(args.widths), tuple(args.classes), args.seed, tuple(args.probes), args.claim_step, args.lr,
        args.batch_size, tuple(args.inputs))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
