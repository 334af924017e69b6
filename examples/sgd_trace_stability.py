"""Dynamical stability of SGD bounds the Hessian trace (Wu & Su 2023), with full-batch GD as the control.

Single-sample SGD (batch size 1) trains a tanh MLP 64-64-64-1 to interpolation on 256 digits with a scalar
squared loss, ``L = (1/N) sum_i 0.5 (f(x_i) - t_i)^2`` with ``t = +1`` for even digits and ``-1`` for odd
ones, at step sizes on both sides of instability. Near an interpolating minimum each sample's Hessian is
``j_i j_i^T`` (rank one), and linear stability of SGD in mean square requires about ``Tr(H) <= 2 / lr``
(Wu & Su 2023): a constraint on *all* curvature directions, while gradient descent only needs
``lambda_max <= 2 / lr``. ``hutchpp_trace`` on a ``HessianOperator`` over the 256 samples measures
``Tr(H)`` (Hutch++, 90 products, standard error reported) and ``lanczos`` ``lambda_max``, every
``steps / 10`` steps.

Claim: every SGD run that stays stable (finite loss, below its starting value) ends with
``Tr(H) * lr / 2 <= 1.05`` (median over the last quarter of its probes).
Control: full-batch GD at the same step sizes is held only by ``lambda_max * lr / 2 <= ~1``; where SGD
diverges, GD trains stably with ``Tr(H) * lr / 2`` above 1.
Beyond the claim: with the 10-class one-hot squared loss each sample's Hessian ``J_i^T J_i`` has rank up
to 10, the single-output bound does not apply, and stable SGD runs end with ``Tr(H) * lr / 2`` well above
1; the script prints ``mean_i lambda_max(J_i J_i^T) * lr / 2``, the per-sample quantity that plays the
role of the trace there (our reading, not a result of the paper).

Run (one thread, about 6.5 minutes on the shared 2-core machine of examples/RESULTS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/sgd_trace_stability.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import digits, median, mlp, squared_loss, verdict  # noqa: E402

from diagnostics import HessianOperator, hutchpp_trace, lanczos  # noqa: E402

BOUND = 1.05


def parity_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Scalar squared loss on the parity target: t = +1 for even digits, -1 for odd ones."""
    x, y = batch
    t = 1.0 - 2.0 * (y % 2).to(x.dtype)
    return 0.5 * (model(x)[:, 0] - t).square().mean()


def per_sample_top(model: torch.nn.Module, x: torch.Tensor) -> float:
    """``mean_i lambda_max(J_i J_i^T)``, ``J_i`` the Jacobian of sample i's outputs in the parameters."""
    from torch.func import functional_call, jacrev, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def out(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi[None],))[0]

    tops = []
    for chunk in x.split(64):
        jac = vmap(jacrev(out), in_dims=(None, 0))(params, chunk)
        J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2).double()
        tops.append(torch.linalg.eigvalsh(J @ J.transpose(1, 2))[:, -1])
    return float(torch.cat(tops).mean())


def probe(model: torch.nn.Module, loss_fn, data: tuple[torch.Tensor, torch.Tensor], lr: float, seed: int) -> dict:
    H = HessianOperator(model, loss_fn, [data])
    tr = hutchpp_trace(H, num_matvecs=90, seed=seed)
    top = lanczos(H, k=1, which="LA", tol=1e-3, seed=seed, max_matvecs=100)
    with torch.no_grad():
        loss = float(loss_fn(model, data))
    return {"loss": loss, "trace_ratio": float(tr.mean) * lr / 2, "trace_stderr": float(tr.stderr) * lr / 2,
            "lambda_ratio": float(top.eigenvalues[0]) * lr / 2}


def train(lr: float, batch_size: int | None, steps: int, outputs: int, seed: int = 0, width: int = 64,
          samples: int = 256) -> dict:
    """SGD with ``batch_size`` samples per step (None: full batch); ten probes over the run."""
    loss_fn = parity_loss if outputs == 1 else squared_loss
    x, y = digits("standardized", samples=samples)
    model = mlp(width, depth=2, classes=outputs, activation="tanh", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    every = max(1, steps // 10)
    t0 = time.perf_counter()
    probes, start, diverged = [], None, False
    for step in range(steps + 1):
        if step % every == 0:
            p = {**probe(model, loss_fn, (x, y), lr, seed), "step": step}
            probes.append(p)
            start = p["loss"] if start is None else start
            if not math.isfinite(p["loss"]) or p["loss"] > 10 * start:
                diverged = True
                break
        if step == steps:
            break
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen) if batch_size else slice(None)
        opt.zero_grad()
        loss = loss_fn(model, (x[idx], y[idx]))
        if not torch.isfinite(loss) or float(loss.detach()) > 1e6:
            diverged = True
            break
        loss.backward()
        opt.step()
    stable = not diverged and probes[-1]["loss"] < start
    tail = probes[-max(1, len(probes) // 4):]
    return {"lr": lr, "batch_size": batch_size, "outputs": outputs, "stable": stable, "probes": probes,
            "trace_ratio_end": median([p["trace_ratio"] for p in tail]),
            "lambda_ratio_end": median([p["lambda_ratio"] for p in tail]),
            "per_sample_top_ratio": per_sample_top(model, x) * lr / 2 if stable and outputs > 1 else math.nan,
            "seconds": time.perf_counter() - t0}


def _show(say, kind: str, r: dict) -> None:
    last = r["probes"][-1]
    say(f"\n{kind} lr {r['lr']}: {'stable' if r['stable'] else 'DIVERGED'} ({r['seconds']:.0f} s); loss "
        f"{r['probes'][0]['loss']:.4f} -> {last['loss']:.3g}")
    say("  step: Tr(H) lr/2 +- stderr, lambda_max lr/2:  " + "  ".join(
        f"{p['step']}: {p['trace_ratio']:.3f}+-{p['trace_stderr']:.3f}, {p['lambda_ratio']:.3f}"
        for p in r["probes"][:: max(1, len(r["probes"]) // 5)]))
    if r["stable"]:
        extra = (f", mean_i lambda_max(J_i J_i^T) lr/2 = {r['per_sample_top_ratio']:.3f}"
                 if r["per_sample_top_ratio"] == r["per_sample_top_ratio"] else "")
        say(f"  end (median of the last quarter of probes): Tr(H) lr/2 = {r['trace_ratio_end']:.3f}, "
            f"lambda_max lr/2 = {r['lambda_ratio_end']:.3f}{extra}")


def run(lrs: tuple[float, ...] = (0.05, 0.08, 0.1, 0.11, 0.12, 0.2, 0.3), sgd_steps: int = 20000, gd_steps: int = 2000,
        multi_lrs: tuple[float, ...] = (0.05, 0.1), seed: int = 0, samples: int = 256,
        verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    say(f"tanh MLP 64-64-64-1, {samples} digits, parity target, scalar squared loss; SGD batch 1 for {sgd_steps} "
        f"steps and full-batch GD for {gd_steps} steps at lr {', '.join(map(str, lrs))}")
    sgd = [train(lr, 1, sgd_steps, 1, seed, samples=samples) for lr in lrs]
    for r in sgd:
        _show(say, "SGD b=1", r)
    gd = [train(lr, None, gd_steps, 1, seed, samples=samples) for lr in lrs]
    for r in gd:
        _show(say, "GD", r)
    multi = [train(lr, 1, sgd_steps, 10, seed, samples=samples) for lr in multi_lrs]
    say("\nbeyond the claim: 10 outputs, one-hot squared loss, SGD batch 1")
    for r in multi:
        _show(say, "SGD b=1, 10 outputs,", r)
    checks = [(f"SGD b=1 lr {r['lr']}", r["trace_ratio_end"], r["trace_ratio_end"] <= BOUND) for r in sgd if r["stable"]]
    say(f"\nsummary: Tr(H) lr / 2 at the end of stable batch-size-1 SGD runs, scalar output (tolerance <= {BOUND}); "
        f"{len(checks)} of {len(sgd)} runs stable")
    for name, value, ok in checks:
        say(f"  {name:18s} {value:.3f}  {verdict(ok)}")
    say("  diverged SGD runs: " + (", ".join(f"lr {r['lr']} (Tr(H) lr/2 = {r['probes'][0]['trace_ratio']:.2f} at the "
                                              "start)" for r in sgd if not r["stable"]) or "none"))
    say("control, full-batch GD at the same step sizes: end Tr(H) lr/2, lambda_max lr/2")
    for r in gd:
        say(f"  GD lr {r['lr']:<5} " + (f"{r['trace_ratio_end']:.3f}  {r['lambda_ratio_end']:.3f}" if r["stable"]
                                        else "diverged"))
    say("10 outputs, stable SGD b=1: end Tr(H) lr/2, mean_i lambda_max(J_i J_i^T) lr/2")
    for r in multi:
        say(f"  lr {r['lr']:<5} " + (f"{r['trace_ratio_end']:.3f}  {r['per_sample_top_ratio']:.3f}" if r["stable"]
                                     else "diverged"))
    say("all checks:", verdict(bool(checks) and all(ok for _, _, ok in checks)))
    return {"sgd": sgd, "gd": gd, "multi": multi, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.08, 0.1, 0.11, 0.12, 0.2, 0.3])
    parser.add_argument("--sgd-steps", type=int, default=20000)
    parser.add_argument("--gd-steps", type=int, default=2000)
    parser.add_argument("--multi-lrs", type=float, nargs="*", default=[0.05, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    run(tuple(args.lrs), args.sgd_steps, args.gd_steps, tuple(args.multi_lrs), args.seed, args.samples)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
